"""JAX model vs the PyTorch reference on identical weights (fp32, CPU), plus init and API checks."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nanochat_jax import flops, model
from nanochat_jax.common import compute_dtype
from nanochat_jax.config import GPTConfig
from nanochat_jax.convert import params_from_state_dict, state_dict_from_params
from helpers import needs_torch, torch

ROOT = Path(__file__).resolve().parents[1]

if torch is not None:
    from nanochat_jax.torch_ref import GPT as TorchGPT
    from nanochat_jax.torch_ref import generate as torch_generate


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def torch_model(config, seed):
    """A torch-initialized reference with every path switched on.

    At init the projections are zero and smear is off, which would hide bugs in
    attention, MLP and smear; add noise to every parameter so all of them matter.
    """
    torch.manual_seed(seed)
    m = TorchGPT(config, dtype=torch.float32)
    m.init_weights(seed=seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = 0.5 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1
            p.add_(torch.randn_like(p) * scale)
    return m


def noisy_params(config, seed):
    """Our own init with the same noise as torch_model: every path matters, and no torch needed."""
    params = model.init_params(config, jax.random.key(seed), jnp.float32)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + jax.random.normal(k, x.shape) * (0.5 / np.sqrt(x.shape[-1]) if x.ndim == 2 else 0.1)
             for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noisy)


@st.composite
def configs(draw):
    """depth 1-6, MHA or GQA, head_dim 16-64, windows L/SL/SSSL (short window 128 at sequence_len 256)."""
    n_kv, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([d for d in (16, 32, 64) if n_kv * group * d >= 24]))
    return GPTConfig(sequence_len=256, vocab_size=draw(st.sampled_from([100, 300, 512])), n_layer=draw(st.integers(1, 6)),
                     n_head=n_kv * group, n_kv_head=n_kv, n_embd=n_kv * group * head_dim,
                     window_pattern=draw(st.sampled_from(["L", "SL", "SSSL"])))


@needs_torch
@settings(max_examples=15)
@given(config=configs(), B=st.integers(1, 4), T=st.sampled_from([16, 64, 160, 256]), seed=st.integers(0, 2**16))
def test_forward_loss_and_grads_match_torch(config, B, T, seed):
    ref = torch_model(config, seed)
    params = jax.tree.map(jnp.asarray, params_from_state_dict(ref.state_dict(), config))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    targets[rng.random((B, T)) < 0.2] = -1  # ignored positions

    ref.zero_grad()
    logits_t = ref(torch.from_numpy(tokens))
    loss_t = ref(torch.from_numpy(tokens), torch.from_numpy(targets))
    loss_t.backward()
    grads_t = {k: p.grad.numpy() for k, p in ref.named_parameters()}

    def f(p, x, y):
        logits = model.forward(p, x, config, dtype=jnp.float32)
        return model.cross_entropy(logits, y), logits

    (loss_j, logits_j), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params, tokens, targets)
    assert logits_j.shape == (B, T, config.vocab_size) and logits_j.dtype == jnp.float32
    assert rel_err(logits_j, logits_t.detach().numpy()) <= 1e-5
    # The training path: loss_fn fuses the head into the loss (model.softcap_nll, own VJP).
    loss_f, grads_f = jax.jit(jax.value_and_grad(
        lambda p, x, y: model.loss_fn(p, x, y, config, dtype=jnp.float32)))(params, tokens, targets)
    # Relative 1e-4 per parameter, above a noise floor of 1e-6 of the global gradient norm:
    # at depth 1 the backout tap is the last block, and the final RMSNorm is scale
    # invariant, so d loss/d backout_lambda is exactly 0 and both sides hold only rounding.
    floor = 1e-6 * np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads_t.values()))
    for loss, g in ((loss_j, grads), (loss_f, grads_f)):
        assert abs(float(loss) - loss_t.item()) <= 1e-6
        grads_j = state_dict_from_params(g, config)
        assert set(grads_j) == set(grads_t)
        for k in grads_t:
            err = np.linalg.norm(np.asarray(grads_j[k], np.float64) - grads_t[k])
            assert err <= 1e-4 * np.linalg.norm(grads_t[k]) + floor, (k, rel_err(grads_j[k], grads_t[k]))


@needs_torch
def test_parity_holds_at_xlas_default_optimization_level():
    """The suite compiles at LLVM -O0 (xla_flags.py); what users run is XLA's default level, which
    rounds a little differently. Two configs of the parity test above, in a fresh process at the
    default level: the same bars hold there."""
    script = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, "tests")
        assert "optimization_level" not in os.environ["XLA_FLAGS"]
        from nanochat_jax.config import GPTConfig
        from test_model import test_forward_loss_and_grads_match_torch as parity
        for cfg, B, T in [(GPTConfig(sequence_len=256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                                     window_pattern="SSSL"), 2, 160),
                          (GPTConfig(sequence_len=256, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                                     window_pattern="L"), 3, 64)]:
            parity.hypothesis.inner_test(config=cfg, B=B, T=T, seed=7)
        print("parity ok")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "parity ok" in r.stdout, (r.stdout + r.stderr)[-3000:]


@needs_torch
def test_loss_reductions_match_torch():
    config = GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    ref = torch_model(config, 0)
    params = params_from_state_dict(ref.state_dict(), config)
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, 100, (2, 32)), rng.integers(0, 100, (2, 32))
    targets[0, :5] = -1
    none_t = ref(torch.from_numpy(tokens), torch.from_numpy(targets), loss_reduction="none").detach().numpy()
    none_j = model.loss_fn(params, tokens, targets, config, reduction="none", dtype=jnp.float32)
    assert none_j.shape == (64,)
    np.testing.assert_allclose(none_j, none_t, rtol=1e-5, atol=1e-6)
    assert float(model.loss_fn(params, tokens, targets, config, reduction="sum", dtype=jnp.float32)) == pytest.approx(none_t.sum(), rel=1e-6)
    all_ignored = np.full_like(targets, -1)
    assert float(model.loss_fn(params, tokens, all_ignored, config, dtype=jnp.float32)) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        model.cross_entropy(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), "avg")


@needs_torch
def test_greedy_generation_matches_torch():
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    ref = torch_model(config, 1)
    params = params_from_state_dict(ref.state_dict(), config)
    prompt = [5, 17, 250, 3]
    want = list(torch_generate(ref, prompt, max_tokens=12, temperature=0.0))
    got = list(model.generate(params, prompt, config, 12, temperature=0.0, dtype=jnp.float32))
    assert got == want
    # sampling: seeded, reproducible, respects top-k
    a = list(model.generate(params, prompt, config, 8, temperature=1.0, seed=3, dtype=jnp.float32))
    assert a == list(model.generate(params, prompt, config, 8, temperature=1.0, seed=3, dtype=jnp.float32))
    assert a != list(model.generate(params, prompt, config, 8, temperature=1.0, seed=4, dtype=jnp.float32))
    assert list(model.generate(params, prompt, config, 6, temperature=1.0, top_k=1, dtype=jnp.float32)) == want[:6]


def test_init_matches_spec_statistics():
    config = GPTConfig(sequence_len=64, vocab_size=4096, n_layer=5, n_head=4, n_kv_head=4, n_embd=256)
    p = model.init_params(config, jax.random.key(0), jnp.float32)
    s = np.sqrt(3) / np.sqrt(256)
    assert np.std(p["wte"]) == pytest.approx(0.8, rel=0.01)
    assert np.std(p["lm_head"]["kernel"]) == pytest.approx(0.001, rel=0.01)
    for i in range(5):
        blk = p[f"h_{i}"]
        for name in ("c_q", "c_k", "c_v"):
            w = np.asarray(blk["attn"][name]["kernel"])
            assert np.abs(w).max() <= s and np.std(w) == pytest.approx(s / np.sqrt(3), rel=0.03)
        assert not np.any(blk["attn"]["c_proj"]["kernel"]) and not np.any(blk["mlp"]["c_proj"]["kernel"])
        assert np.std(blk["mlp"]["c_fc"]["kernel"]) == pytest.approx(0.4 * s / np.sqrt(3), rel=0.03)
        if config.has_ve(i):
            g = np.asarray(blk["attn"]["ve_gate"]["kernel"])
            assert g.min() >= 0 and g.max() <= 0.02
            assert np.abs(p[f"ve_{i}"]).max() <= s and np.std(p[f"ve_{i}"]) == pytest.approx(s / np.sqrt(3), rel=0.03)
        else:
            assert "ve_gate" not in blk["attn"] and f"ve_{i}" not in p
    np.testing.assert_allclose(p["resid_lambdas"], [1.15, 1.125, 1.10, 1.075, 1.05], rtol=1e-6)
    np.testing.assert_allclose(p["x0_lambdas"], [0.20, 0.1625, 0.125, 0.0875, 0.05], rtol=1e-6)
    assert float(p["smear_lambda"][0]) == 0.0 and float(p["backout_lambda"][0]) == pytest.approx(0.2)
    g = np.asarray(p["smear_gate"]["kernel"])
    assert g.shape == (24, 1) and g.min() >= 0 and g.max() <= 0.02


def test_storage_dtypes_and_param_count():
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    p = model.init_params(config, jax.random.key(0), jnp.bfloat16)
    assert p["wte"].dtype == jnp.bfloat16 and p["ve_0"].dtype == jnp.bfloat16 and p["ve_2"].dtype == jnp.bfloat16
    assert p["lm_head"]["kernel"].dtype == jnp.float32 and p["resid_lambdas"].dtype == jnp.float32
    assert sum(x.size for x in jax.tree.leaves(p)) == flops.num_scaling_params(config)["total"]
    if torch is not None:
        assert sum(x.size for x in jax.tree.leaves(p)) == TorchGPT(config, dtype=torch.float32).num_params()
    logits = model.forward(p, jnp.ones((1, 8), jnp.int32), config, dtype=jnp.bfloat16)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("dtype,loss_tol,grad_tol,floor_tol", [
    (jnp.float32, 1e-6, 1e-5, 1e-6),
    # bf16 logits carry ~4e-3 rounding, and XLA may keep the fused GEMM's output in fp32
    (jnp.bfloat16, 1e-3, 3e-2, 5e-3),
])
def test_fused_loss_equals_forward_then_cross_entropy(dtype, loss_tol, grad_tol, floor_tol):
    """loss_fn's fused head (softcap_nll, own VJP) is the same function as forward +
    cross_entropy where the softcap bends, and the padded vocabulary gets zero gradient."""
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    assert config.padded_vocab_size > config.vocab_size
    params = noisy_params(config, 3)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20  # logits ~10: the softcap bends
    rng = np.random.default_rng(0)
    tok, tgt = rng.integers(0, 300, (2, 32)), rng.integers(0, 300, (2, 32))
    tgt[1, :7] = -1
    plain = lambda p: model.cross_entropy(model.forward(p, tok, config, dtype=dtype), tgt)  # noqa: E731
    fused = lambda p: model.loss_fn(p, tok, tgt, config, dtype=dtype)  # noqa: E731
    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(f))(params) for f in (plain, fused))
    assert float(l2) == pytest.approx(float(l1), rel=loss_tol)
    floor = floor_tol * np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(g1)))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g2), jax.tree.leaves(g1)):
        err = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        assert err <= grad_tol * np.linalg.norm(np.asarray(b, np.float64)) + floor, jax.tree_util.keystr(path)
    assert not np.any(np.asarray(g2["lm_head"]["kernel"][:, config.vocab_size:]))
    assert float(jnp.abs(g2["lm_head"]["kernel"][:, :config.vocab_size]).max()) > 0


def test_bf16_forward_tracks_fp32():
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    p32 = noisy_params(config, 2)
    tok = np.random.default_rng(0).integers(0, 300, (2, 32))
    l32 = model.forward(p32, tok, config, dtype=jnp.float32)
    l16 = model.forward(p32, tok, config, dtype=jnp.bfloat16)
    assert 1e-4 < rel_err(l16, l32) < 5e-2  # really computed in bf16, and still the same function


def test_every_param_has_logical_axes():
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    params = model.init_params(config, jax.random.key(0), jnp.float32)
    axes = model.param_axes(config)
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_a = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert [k for k, _ in flat_p] == [k for k, _ in flat_a]
    for (_, x), (_, spec) in zip(flat_p, flat_a):
        assert len(spec) == x.ndim
    assert axes["wte"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert axes["h_0"]["attn"]["c_q"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")
    assert axes["h_1"]["mlp"]["c_proj"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")


@pytest.mark.parametrize("config", [
    GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64),
    GPTConfig(sequence_len=64, vocab_size=100, n_layer=4, n_head=2, n_kv_head=1, n_embd=32, window_pattern="L"),
], ids=str)
def test_declared_axes_equal_traced_init(config):
    """param_axes (no tracing) is exactly what Flax's init reports from the modules' boxes."""
    import flax.linen as nn
    boxed = jax.eval_shape(lambda: model.GPT(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    assert model.param_axes(config) == nn.get_partition_spec(boxed)


def test_splash_interpret_model_equals_xla():
    config = GPTConfig(sequence_len=256, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, window_pattern="S")
    params = noisy_params(config, 3)
    tok = np.random.default_rng(0).integers(0, 100, (1, 256))
    ref = model.forward(params, tok, config, dtype=jnp.float32, backend="xla")
    out = model.forward(params, tok, config, dtype=jnp.float32, backend="splash-interpret")
    assert rel_err(out, ref) <= 1e-5


def test_compute_dtype_env_override(monkeypatch):
    assert compute_dtype() == jnp.float32  # CPU default
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert compute_dtype() == jnp.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE"):
        compute_dtype()
