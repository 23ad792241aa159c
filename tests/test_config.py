import pytest

from nanochat_jax.config import GPTConfig, config_for_depth


@pytest.mark.parametrize("depth,C,H,n_ve", [(4, 256, 2, 2), (8, 512, 4, 4), (12, 768, 6, 6), (16, 1024, 8, 8),
                                            (20, 1280, 10, 10), (24, 1536, 12, 12), (26, 1664, 13, 13), (32, 2048, 16, 16)])
def test_depth_dial_matches_spec_table(depth, C, H, n_ve):
    cfg = config_for_depth(depth)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (C, H, H, 128)
    assert len(cfg.ve_layers) == n_ve
    assert cfg.padded_vocab_size == 32768 and cfg.sequence_len == 2048


def test_runcpu_d6_rounds_width_up_to_head_dim():
    cfg = config_for_depth(6, head_dim=64, max_seq_len=512, window_pattern="L")
    assert (cfg.n_embd, cfg.n_head) == (384, 6)
    cfg = config_for_depth(3, aspect_ratio=50, head_dim=64)  # 150 -> 192
    assert (cfg.n_embd, cfg.n_head) == (192, 3)


def test_windows_d24_sssl():
    cfg = config_for_depth(24)
    assert cfg.short_window == 512
    long_layers = [i for i, w in enumerate(cfg.window_sizes) if w == 2048]
    assert long_layers == [3, 7, 11, 15, 19, 23]
    assert set(cfg.window_sizes) == {512, 2048}


@pytest.mark.parametrize("T,short", [(2048, 512), (256, 128), (64, 128), (1000, 256), (4096, 1024)])
def test_short_window_rounds_quarter_up_to_128(T, short):
    assert GPTConfig(sequence_len=T, n_layer=2).short_window == short


def test_last_layer_always_long_and_pattern_tiles():
    cfg = GPTConfig(sequence_len=1024, n_layer=5, window_pattern="S")
    assert cfg.window_sizes == (256, 256, 256, 256, 1024)
    cfg = GPTConfig(sequence_len=1024, n_layer=4, window_pattern="SL")
    assert cfg.window_sizes == (256, 1024, 256, 1024)


@pytest.mark.parametrize("L,ve", [(1, (0,)), (2, (1,)), (3, (0, 2)), (4, (1, 3))])
def test_ve_layers_alternate_ending_at_last(L, ve):
    assert GPTConfig(n_layer=L).ve_layers == ve


def test_vocab_padding():
    assert GPTConfig(vocab_size=300).padded_vocab_size == 320
    assert GPTConfig(vocab_size=50257).padded_vocab_size == 50304
    assert GPTConfig(vocab_size=64).padded_vocab_size == 64


@pytest.mark.parametrize("kwargs,msg", [
    (dict(n_embd=100, n_head=3), "not divisible by n_head"),
    (dict(n_head=6, n_kv_head=4), "not a multiple of n_kv_head"),
    (dict(window_pattern="SSXL"), "window_pattern"),
    (dict(window_pattern=""), "window_pattern"),
    (dict(window_pattern="sssl"), "window_pattern"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_embd=96, n_head=32, n_kv_head=32), "even"),
    (dict(n_embd=16, n_head=2, n_kv_head=2), "smear"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_configs_fail_with_reason(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        GPTConfig(**kwargs)


def test_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        config_for_depth(0)


def test_dict_round_trip_and_old_checkpoint_default():
    cfg = GPTConfig(sequence_len=512, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    del d["window_pattern"]
    assert GPTConfig.from_dict(d).window_pattern == "L"
    with pytest.raises(ValueError, match="unknown model_config keys"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_blocks": 3})
