"""Parameter/FLOP accounting against upstream's table (docs/numerics.md#costs) and independent brute-force counts."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat_jax.config import GPTConfig, config_for_depth
from nanochat_jax.flops import (
    estimate_flops,
    num_matmul_params,
    num_scaling_params,
    scaling_params,
    summary,
)

# upstream's table: depth -> (total, wte, value_embeds, lm_head, transformer_matrices, scaling, FLOPs/token)
# wte / value_embeds / lm_head are printed rounded to 0.1M there (exact only for d12).
TABLE = {
    12: (286_261_730, 25_165_824, 150_994_944, 25_165_824, 84_935_088, 110_100_912, 7.60e8),
    16: (536_871_738, 33.6e6, 268.4e6, 33.6e6, 201_327_360, 234_881_792, 1.59e9),
    20: (896_533_746, 41.9e6, 419.4e6, 41.9e6, 393_217_200, 435_160_240, 2.89e9),
    24: (1_384_122_122, 50.3e6, 604.0e6, 50.3e6, 679_478_976, 729_810_624, 4.78e9),
    26: (1_681_786_938, 54.5e6, 708.8e6, 54.5e6, 863_897_580, 918_423_532, 5.99e9),
    32: (2_818_575_450, 67.1e6, 1073.7e6, 67.1e6, 1_610_615_808, 1_677_724_672, 1.08e10),
}


@pytest.mark.parametrize("depth", sorted(TABLE))
def test_spec_table(depth):
    total, wte, ve, lm, mats, scaling, fpt = TABLE[depth]
    cfg = config_for_depth(depth)
    p = num_scaling_params(cfg)
    assert p["total"] == total
    assert p["transformer_matrices"] == mats
    assert scaling_params(cfg) == scaling
    assert p["scalars"] == 2 * depth + 26
    # exact products, rounded the way the table prints them
    C, Vp = cfg.n_embd, cfg.padded_vocab_size
    assert p["wte"] == p["lm_head"] == Vp * C
    assert p["value_embeds"] == (depth // 2) * Vp * C  # Hkv·hd == C, VE on half the layers (all depths even)
    for got, want in ((p["wte"], wte), (p["value_embeds"], ve), (p["lm_head"], lm)):
        if isinstance(want, int):  # d12 row prints the exact integer
            assert got == want
        else:
            assert round(got / 1e6, 1) == pytest.approx(want / 1e6, abs=1e-9)
    assert float(f"{estimate_flops(cfg):.3g}") == fpt
    assert isinstance(estimate_flops(cfg), int)


def test_d12_flops_by_hand():
    # 12 layers, 3 long (2048) + 9 short (512), H·hd = 768; matmul = scaling + smear_gate(24)
    cfg = config_for_depth(12)
    assert num_matmul_params(cfg) == 110_100_912 + 24
    assert estimate_flops(cfg) == 6 * (110_100_912 + 24) + 12 * 768 * (3 * 2048 + 9 * 512) == 759_696_048


def test_d24_windows():
    ws = config_for_depth(24).window_sizes
    assert [i for i, w in enumerate(ws) if w == 2048] == [3, 7, 11, 15, 19, 23]
    assert all(w == 512 for i, w in enumerate(ws) if i % 4 != 3)


# ---- brute force over upstream's state_dict inventory, written out independently ----


def inventory(cfg):
    """[(name, shape, is_linear)] exactly as upstream's state_dict lists them."""
    C, H, Hkv, L = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_layer
    hd = C // H
    Vp = -(-cfg.vocab_size // 64) * 64
    ve_layers = [i for i in range(L) if (i % 2 == 1 if L % 2 == 0 else i % 2 == 0)]
    out = []
    for i in range(L):
        out += [
            (f"h.{i}.attn.c_q", (H * hd, C), True),
            (f"h.{i}.attn.c_k", (Hkv * hd, C), True),
            (f"h.{i}.attn.c_v", (Hkv * hd, C), True),
            (f"h.{i}.attn.c_proj", (C, C), True),
            (f"h.{i}.mlp.c_fc", (4 * C, C), True),
            (f"h.{i}.mlp.c_proj", (C, 4 * C), True),
        ]
        if i in ve_layers:
            out.append((f"h.{i}.attn.ve_gate", (Hkv, 12), True))
    out += [("wte", (Vp, C), False), ("lm_head", (Vp, C), True)]
    out += [(f"value_embeds.{i}", (Vp, Hkv * hd), False) for i in ve_layers]
    out += [("resid_lambdas", (L,), False), ("x0_lambdas", (L,), False)]
    out += [("smear_gate", (1, 24), True), ("smear_lambda", (1,), False), ("backout_lambda", (1,), False)]
    return out


def windows(cfg):
    T = cfg.sequence_len
    short = -(-(-(-T // 4)) // 128) * 128
    pat = cfg.window_pattern
    ws = [T if pat[i % len(pat)] == "L" else short for i in range(cfg.n_layer)]
    ws[-1] = T
    return ws


SMALL = [
    GPTConfig(sequence_len=256, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL"),
    GPTConfig(sequence_len=256, vocab_size=300, n_layer=4, n_head=4, n_kv_head=1, n_embd=64, window_pattern="SSSL"),
    GPTConfig(sequence_len=100, vocab_size=320, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="S"),
    GPTConfig(sequence_len=512, vocab_size=257, n_layer=5, n_head=6, n_kv_head=3, n_embd=48, window_pattern="L"),
]


def check_against_inventory(cfg):
    inv = inventory(cfg)
    numel = {name: math.prod(shape) for name, shape, _ in inv}
    p = num_scaling_params(cfg)
    assert p["total"] == sum(numel.values())
    assert p["wte"] == numel["wte"] and p["lm_head"] == numel["lm_head"]
    assert p["value_embeds"] == sum(v for k, v in numel.items() if k.startswith("value_embeds."))
    assert p["transformer_matrices"] == sum(v for k, v in numel.items() if k.startswith("h."))
    assert p["scalars"] == sum(numel[k] for k in ("resid_lambdas", "x0_lambdas", "smear_gate", "smear_lambda", "backout_lambda"))
    assert scaling_params(cfg) == p["transformer_matrices"] + p["lm_head"]
    mm = sum(math.prod(shape) for _, shape, lin in inv if lin)
    assert num_matmul_params(cfg) == mm
    ws = windows(cfg)
    assert tuple(ws) == cfg.window_sizes
    T, Hhd = cfg.sequence_len, cfg.n_head * cfg.head_dim
    assert estimate_flops(cfg) == 6 * mm + sum(12 * Hhd * min(w, T) for w in ws)


@pytest.mark.parametrize("cfg", SMALL, ids=lambda c: f"L{c.n_layer}H{c.n_head}kv{c.n_kv_head}V{c.vocab_size}")
def test_small_configs_brute_force(cfg):
    check_against_inventory(cfg)


@settings(max_examples=60, deadline=None)
@given(
    n_layer=st.integers(1, 9),
    hd_half=st.integers(1, 8),
    n_kv=st.integers(1, 4),
    group=st.integers(1, 3),
    vocab=st.integers(1, 700),
    T=st.integers(2, 600),
    pattern=st.text(alphabet="SL", min_size=1, max_size=5),
)
def test_random_configs_brute_force(n_layer, hd_half, n_kv, group, vocab, T, pattern):
    H = n_kv * group
    C = H * 2 * hd_half
    if C < 24:
        C = H * 2 * (-(-24 // (2 * H)))
    cfg = GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=n_layer, n_head=H, n_kv_head=n_kv, n_embd=C, window_pattern=pattern)
    check_against_inventory(cfg)


def test_tiny_config_by_hand():
    # C=64 H=4 Hkv=2 hd=16 L=3 Vp=320; windows (128, 256, 256); VE on layers 0 and 2
    cfg = SMALL[0]
    assert cfg.padded_vocab_size == 320 and cfg.window_sizes == (128, 256, 256) and cfg.ve_layers == (0, 2)
    block = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 256 * 64  # 45056
    assert num_scaling_params(cfg) == {
        "wte": 20480,
        "value_embeds": 20480,
        "lm_head": 20480,
        "transformer_matrices": 3 * block + 2 * 24,  # 135216
        "scalars": 32,
        "total": 196688,
    }
    assert num_matmul_params(cfg) == 155720
    assert estimate_flops(cfg) == 6 * 155720 + 12 * 64 * (128 + 256 + 256) == 1_425_840


def test_summary_mentions_groups():
    s = summary(config_for_depth(12))
    for key in ("wte", "value_embeds", "lm_head", "transformer_matrices", "scalars", "total", "FLOPs/token"):
        assert key in s
    assert "286,261,730" in s and "7.597e+08" in s
