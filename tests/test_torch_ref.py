"""Tests of the PyTorch oracle alone (docs/numerics.md#model): if it drifts, JAX parity means nothing.

Everything expected here is recomputed from upstream's rules in the test (inventory, ramps,
windows, and a second, loop-and-complex-number forward), never read back from the
module under test.
"""

import math

import pytest

torch = pytest.importorskip("torch", reason="tests of the torch reference backend need torch")
import torch.nn.functional as F  # noqa: E402

from nanochat_jax.config import GPTConfig  # noqa: E402
from nanochat_jax.torch_ref import GPT, generate  # noqa: E402
from nanochat_jax.torch_ref.model import sliding_window_mask, window_sizes  # noqa: E402

SMALL = dict(sequence_len=256, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)


def small(**overrides) -> GPTConfig:
    return GPTConfig(**{**SMALL, **overrides})


def randomized(model: GPT, seed: int = 0) -> GPT:
    """Replace every parameter with noise so zero-initialized paths (c_proj, smear) matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        model.resid_lambdas.uniform_(0.8, 1.2, generator=gen)
        model.x0_lambdas.uniform_(0.0, 0.3, generator=gen)
    return model


def expected_inventory(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    L, C, H, Hkv = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head
    hd = C // H
    Vp = -(-cfg.vocab_size // 64) * 64
    ve_layers = [i for i in range(L) if i % 2 == (L - 1) % 2]
    inv = {
        "transformer.wte.weight": (Vp, C),
        "lm_head.weight": (Vp, C),
        "resid_lambdas": (L,),
        "x0_lambdas": (L,),
        "smear_gate.weight": (1, 24),
        "smear_lambda": (1,),
        "backout_lambda": (1,),
    }
    for i in range(L):
        p = f"transformer.h.{i}."
        inv[p + "attn.c_q.weight"] = (H * hd, C)
        inv[p + "attn.c_k.weight"] = (Hkv * hd, C)
        inv[p + "attn.c_v.weight"] = (Hkv * hd, C)
        inv[p + "attn.c_proj.weight"] = (C, C)
        inv[p + "mlp.c_fc.weight"] = (4 * C, C)
        inv[p + "mlp.c_proj.weight"] = (C, 4 * C)
    for i in ve_layers:
        inv[f"transformer.h.{i}.attn.ve_gate.weight"] = (Hkv, 12)
        inv[f"value_embeds.{i}.weight"] = (Vp, Hkv * hd)
    return inv


# ---- inventory ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_layer, ve_layers", [(3, [0, 2]), (4, [1, 3]), (1, [0])])
def test_state_dict_matches_spec_inventory(n_layer, ve_layers):
    cfg = small(n_layer=n_layer)
    sd = GPT(cfg, dtype=torch.float32).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_inventory(cfg)
    assert sorted(int(k.split(".")[1]) for k in sd if k.startswith("value_embeds.")) == ve_layers
    assert sd["transformer.wte.weight"].shape[0] == 320  # vocab 300 padded to a multiple of 64
    assert "cos" not in sd and "sin" not in sd
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_num_params_counts_every_tensor():
    cfg = small()
    assert GPT(cfg, dtype=torch.float32).num_params() == sum(math.prod(s) for s in expected_inventory(cfg).values())


@pytest.mark.parametrize(
    "dtype, table_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float32, torch.float32)]
)
def test_storage_dtypes(dtype, table_dtype):
    model = GPT(small(), dtype=dtype)
    for name, p in model.state_dict().items():
        is_table = name == "transformer.wte.weight" or name.startswith("value_embeds.")
        assert p.dtype == (table_dtype if is_table else torch.float32), name
    hd = 64 // 4
    assert model.cos.shape == model.sin.shape == (1, 10 * 256, 1, hd // 2)
    assert model.cos.dtype == model.sin.dtype == dtype


def test_compute_dtype_from_env(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert GPT(small()).transformer.wte.weight.dtype == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "float64")
    with pytest.raises(ValueError):
        GPT(small())


# ---- init --------------------------------------------------------------------------------


def test_init_statistics():
    cfg = small(n_layer=4)
    model = GPT(cfg, dtype=torch.float32)
    C = cfg.n_embd
    s = math.sqrt(3) / math.sqrt(C)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.03)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.03)
    for block in model.transformer.h:
        for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight):
            assert w.abs().max().item() <= s
            assert w.std().item() == pytest.approx(1 / math.sqrt(C), rel=0.05)
        assert block.mlp.c_fc.weight.abs().max().item() <= 0.4 * s
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.4 / math.sqrt(C), rel=0.05)
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    for ve in model.value_embeds.values():
        assert ve.weight.abs().max().item() <= s
        assert ve.weight.std().item() == pytest.approx(1 / math.sqrt(C), rel=0.05)
    gates = [model.smear_gate.weight] + [model.transformer.h[i].attn.ve_gate.weight for i in (1, 3)]
    for g in gates:
        assert g.min().item() >= 0.0 and g.max().item() <= 0.02 and g.std().item() > 0
    L = cfg.n_layer
    resid = torch.tensor([1.15 - 0.10 * i / (L - 1) for i in range(L)], dtype=torch.float32)
    x0 = torch.tensor([0.20 - 0.15 * i / (L - 1) for i in range(L)], dtype=torch.float32)
    assert torch.equal(model.resid_lambdas.data, resid)
    assert torch.equal(model.x0_lambdas.data, x0)
    assert model.resid_lambdas[0].item() == pytest.approx(1.15) and model.resid_lambdas[-1].item() == pytest.approx(1.05)
    assert model.smear_lambda.item() == 0.0
    assert model.backout_lambda.item() == pytest.approx(0.2)


def test_single_layer_ramps_do_not_divide_by_zero():
    model = GPT(small(n_layer=1), dtype=torch.float32)
    assert model.resid_lambdas.tolist() == pytest.approx([1.15])
    assert model.x0_lambdas.tolist() == pytest.approx([0.20])


def test_init_is_seeded_and_reinit_is_reproducible():
    a, b = GPT(small(), dtype=torch.bfloat16), GPT(small(), dtype=torch.bfloat16)
    sd_a = a.state_dict()
    for k, v in b.state_dict().items():
        assert torch.equal(v, sd_a[k]), k
    before = {k: v.clone() for k, v in sd_a.items()}
    a.init_weights(seed=7)
    assert not torch.equal(a.transformer.wte.weight, before["transformer.wte.weight"])
    a.init_weights(seed=42)  # re-init of an already-cast model redraws the same fp32 values
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_init_draw_order_replays_spec():
    # upstream's init order: wte, lm_head, per block (c_q, c_k, c_v, c_fc), smear_gate, VE tables, ve_gates.
    cfg = small(n_layer=4)
    model = GPT(cfg, dtype=torch.float32)
    C, Vp, kv = cfg.n_embd, 320, cfg.n_kv_head * cfg.n_embd // cfg.n_head
    s = math.sqrt(3 / C)
    gen = torch.Generator().manual_seed(42)

    def uniform(shape, lo, hi):
        return torch.empty(shape).uniform_(lo, hi, generator=gen)

    want = {
        "transformer.wte.weight": torch.empty(Vp, C).normal_(0, 0.8, generator=gen),
        "lm_head.weight": torch.empty(Vp, C).normal_(0, 0.001, generator=gen),
    }
    for i in range(4):
        for name, rows in (("c_q", C), ("c_k", kv), ("c_v", kv)):
            want[f"transformer.h.{i}.attn.{name}.weight"] = uniform((rows, C), -s, s)
        want[f"transformer.h.{i}.mlp.c_fc.weight"] = uniform((4 * C, C), -0.4 * s, 0.4 * s)
    want["smear_gate.weight"] = uniform((1, 24), 0, 0.02)
    for i in (1, 3):
        want[f"value_embeds.{i}.weight"] = uniform((Vp, kv), -s, s)
    for i in (1, 3):
        want[f"transformer.h.{i}.attn.ve_gate.weight"] = uniform((cfg.n_kv_head, 12), 0, 0.02)
    sd = model.state_dict()
    for name, w in want.items():
        assert torch.equal(sd[name], w), name


# ---- windows -----------------------------------------------------------------------------


def test_window_sizes_follow_pattern_and_force_last_long():
    d24 = GPTConfig(sequence_len=2048, n_layer=24, n_head=12, n_kv_head=12, n_embd=1536, window_pattern="SSSL")
    assert window_sizes(d24) == [2048 if i % 4 == 3 else 512 for i in range(24)]
    assert window_sizes(small(window_pattern="S", n_layer=3)) == [128, 128, 256]  # ceil(64/128)·128
    assert window_sizes(small(window_pattern="LS", n_layer=4)) == [256, 128, 256, 256]
    assert window_sizes(small(sequence_len=1000, window_pattern="S", n_layer=2)) == [256, 1000]  # ceil(250/128)·128


def test_sliding_window_mask():
    mask = sliding_window_mask(6, 2)
    expected = torch.tensor([[0 <= i - j <= 2 for j in range(6)] for i in range(6)])
    assert torch.equal(mask, expected)
    assert mask[5].nonzero().flatten().tolist() == [3, 4, 5]  # left + 1 keys including itself


def _logit_change(model, idx, pos):
    """Max |Δlogits| per position after changing the token at `pos`."""
    changed = idx.clone()
    changed[0, pos] = (changed[0, pos] + 1) % model.config.vocab_size
    return (model(changed) - model(idx)).abs().amax(dim=(0, 2))


def test_short_window_blocks_distant_tokens_in_model():
    # Two layers: layer 0 short (left = 128), layer 1 forced long. Zeroing layer 1's values
    # (c_v and its value-embedding table) silences its attention, so token 0 can reach
    # position t only through layer 0's window, widened by one step of smear.
    model = randomized(GPT(small(n_layer=2, window_pattern="S"), dtype=torch.float32))
    with torch.no_grad():
        model.transformer.h[1].attn.c_v.weight.zero_()
        model.value_embeds["1"].weight.zero_()
    idx = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    delta = _logit_change(model, idx, 0)
    assert delta[:130].min() > 1e-4  # within 128 + 1 (smear) of token 0
    assert delta[130:].max() <= 1e-6


def test_long_window_reaches_token_zero_and_stays_causal():
    model = randomized(GPT(small(window_pattern="L"), dtype=torch.float32))
    idx = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(1))
    assert _logit_change(model, idx, 0)[199] > 1e-4
    t = 120
    delta = _logit_change(model, idx, t + 1)
    assert delta[: t + 1].max() == 0
    assert delta[t + 1] > 1e-4


def test_windows_use_sequence_len_beyond_training_length():
    # T > sequence_len: even the "L" layer is windowed at left = sequence_len.
    model = randomized(GPT(small(sequence_len=64, n_layer=1), dtype=torch.float32))
    idx = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(2))
    delta = _logit_change(model, idx, 0)
    assert delta[:66].min() > 1e-4 and delta[66:].max() <= 1e-6
    with pytest.raises(AssertionError):
        model(torch.zeros(1, 641, dtype=torch.long))


# ---- forward against an independent implementation --------------------------------------


def naive_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Upstream's forward (docs/numerics.md#model) in fp32 with explicit loops, complex rotary and a hand softmax."""
    cfg = model.config
    P = {k: v.float() for k, v in model.state_dict().items()}
    L, C, H, Hkv = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head
    hd = C // H
    B, T = idx.shape
    eps = torch.finfo(torch.float32).eps

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def lin(x, name):
        return x @ P[name].T

    def rotate(x_BTNh):  # (x1 + i·x2)·e^{-iθ}: nanochat's sign
        theta = torch.arange(T)[:, None].float() * 100000.0 ** (-torch.arange(0, hd, 2).float() / hd)
        z = torch.complex(x_BTNh[..., : hd // 2], x_BTNh[..., hd // 2 :]) * torch.polar(torch.ones_like(theta), -theta)[:, None]
        return torch.cat([z.real, z.imag], dim=-1)

    short = math.ceil(math.ceil(cfg.sequence_len / 4) / 128) * 128
    emb = rms(P["transformer.wte.weight"][idx])
    x = emb.clone()
    for t in range(1, T):
        g = P["smear_lambda"] * torch.sigmoid(emb[:, t, :24] @ P["smear_gate.weight"].T)
        x[:, t] = emb[:, t] + g * emb[:, t - 1]
    x0 = x
    for i in range(L):
        pre = f"transformer.h.{i}."
        left = cfg.sequence_len if i == L - 1 or cfg.window_pattern[i % len(cfg.window_pattern)] == "L" else short
        x = P["resid_lambdas"][i] * x + P["x0_lambdas"][i] * x0
        h = rms(x)
        q = lin(h, pre + "attn.c_q.weight").view(B, T, H, hd)
        k = lin(h, pre + "attn.c_k.weight").view(B, T, Hkv, hd)
        v = lin(h, pre + "attn.c_v.weight").view(B, T, Hkv, hd)
        if f"value_embeds.{i}.weight" in P:
            gate = 3 * torch.sigmoid(lin(h[..., :12], pre + "attn.ve_gate.weight"))
            v = v + gate[..., None] * P[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, hd)
        q, k = 1.2 * rms(rotate(q)), 1.2 * rms(rotate(k))
        rep = H // Hkv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        scores = scores.masked_fill(~((dist >= 0) & (dist <= left)), float("-inf"))
        w = (scores - scores.amax(-1, keepdim=True)).exp()
        y = torch.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdim=True), v).reshape(B, T, C)
        x = x + lin(y, pre + "attn.c_proj.weight")
        x = x + lin(torch.relu(lin(rms(x), pre + "mlp.c_fc.weight")) ** 2, pre + "mlp.c_proj.weight")
        if i == L // 2:
            x_mid = x
    x = x - P["backout_lambda"] * x_mid
    logits = lin(rms(x), "lm_head.weight")[..., : cfg.vocab_size]
    return 15 * torch.tanh(logits / 15)


@pytest.mark.parametrize(
    "overrides, T",
    [
        (dict(), 40),
        (dict(n_layer=4, n_kv_head=4), 33),  # even depth, no GQA
        (dict(sequence_len=64, n_layer=3, window_pattern="LSL", n_kv_head=1), 150),  # T > windows
    ],
)
def test_forward_matches_independent_implementation(overrides, T):
    model = randomized(GPT(small(**overrides), dtype=torch.float32), seed=3)
    with torch.no_grad():  # keep activations in a range where softcap/softmax are not saturated
        for p in model.parameters():
            p.mul_(0.5)
    idx = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(idx)
        want = naive_forward(model, idx)
    assert got.dtype == torch.float32 and got.shape == (2, T, 300)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_bf16_forward_is_close_to_fp32_and_returns_fp32():
    cfg = small()
    fp32, bf16 = GPT(cfg, dtype=torch.float32), GPT(cfg, dtype=torch.bfloat16)
    bf16.load_state_dict(randomized(fp32).state_dict())
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        lo, hi = bf16(idx), fp32(idx)
    assert lo.dtype == torch.float32
    assert (lo - hi).abs().max() < 0.25 * hi.abs().max()
    assert not torch.equal(lo, hi)


# ---- loss --------------------------------------------------------------------------------


def test_loss_reductions_and_ignore_index():
    model = randomized(GPT(small(), dtype=torch.float32))
    gen = torch.Generator().manual_seed(6)
    idx = torch.randint(0, 300, (2, 24), generator=gen)
    targets = torch.randint(0, 300, (2, 24), generator=gen)
    targets[0, :5] = -1
    targets[1, -3:] = -1
    with torch.no_grad():
        mean = model(idx, targets)
        per_token = model(idx, targets, loss_reduction="none")
        logits = model(idx)
    assert per_token.shape == (48,) and per_token.dtype == torch.float32
    keep = targets.view(-1) != -1
    assert torch.all(per_token[~keep] == 0)
    torch.testing.assert_close(mean, per_token[keep].mean())
    manual = -logits.log_softmax(-1).view(-1, 300)[keep].gather(1, targets.view(-1)[keep, None]).squeeze(1)
    torch.testing.assert_close(per_token[keep], manual)


# ---- generation --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen_model():
    return randomized(GPT(small(), dtype=torch.float32), seed=8)


def test_greedy_generation_equals_repeated_argmax(gen_model):
    prompt = [5, 17, 42]
    out = list(generate(gen_model, prompt, 8, temperature=0.0))
    assert out == list(generate(gen_model, prompt, 8, temperature=0.0, seed=123))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(gen_model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]
    assert list(generate(gen_model, prompt, 8, temperature=1.0, top_k=1)) == out
    assert list(generate(gen_model, prompt, 8, temperature=1e-4)) == out  # temperature divides the logits


def test_sampling_is_seeded(gen_model):
    prompt = [1, 2, 3]
    a = list(generate(gen_model, prompt, 10, temperature=1.0, seed=11))
    assert a == list(generate(gen_model, prompt, 10, temperature=1.0, seed=11))
    assert a != list(generate(gen_model, prompt, 10, temperature=1.0, seed=12))
    assert len(a) == 10 and all(isinstance(t, int) and 0 <= t < 300 for t in a)


def test_sampling_replays_nanochat_recipe(gen_model):
    # Same generator and draws as upstream's generate: top-k mask, /temperature, softmax, multinomial.
    prompt, k, temp = [9, 8, 7], 5, 0.7
    out = list(generate(gen_model, prompt, 6, temperature=temp, top_k=k, seed=3))
    rng = torch.Generator().manual_seed(3)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            logits = gen_model(torch.tensor([ids]))[0, -1]
            top = torch.topk(logits, k)
            masked = torch.full_like(logits, float("-inf")).scatter(0, top.indices, top.values)
            ids.append(int(torch.multinomial(F.softmax(masked / temp, -1), 1, generator=rng)))
            assert ids[-1] in top.indices.tolist()
    assert out == ids[len(prompt) :]


def test_generate_runs_under_inference_mode(gen_model):
    flags = []
    handle = gen_model.register_forward_hook(lambda m, i, o: flags.append(torch.is_inference_mode_enabled()))
    try:
        list(generate(gen_model, [1, 2], 2, temperature=0.0))
    finally:
        handle.remove()
    assert flags == [True, True]
