"""Accelerator checks: the model, its gradients, the engine and a sharded training step on the
default device, against the torch reference and against one CPU device.

Marked `gpu`: they skip on CPU, unless NANOCHAT_GPU_TESTS_ON_CPU=1 (the GPU proof kit's
--cpu-smoke sets it), which runs the same bodies on CPU so the kit is proven before any GPU
is at hand. Tolerances are stated per test; the fp32 ones are the CPU parity bars.
"""

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import needs_torch, torch
from test_engine import ByteTokenizer
from nanochat_jax import model, optim, scheduler, sharding
from nanochat_jax.config import GPTConfig
from nanochat_jax.convert import params_from_state_dict, state_dict_from_params
from nanochat_jax.train_step import init_train_state, make_train_step

if torch is not None:
    from nanochat_jax.torch_ref import GPT as TorchGPT

pytestmark = pytest.mark.gpu

# head_dim 64 (cuDNN-friendly), GQA, short windows (T/4) and a long last layer, value embeddings.
CONFIG = GPTConfig(sequence_len=256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                   window_pattern="SSSL")


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def torch_model(config, seed, dtype):
    """The torch reference on the torch device (CUDA when there is one), every path switched on."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    m = TorchGPT(config, dtype=dtype, device=device)
    m.init_weights(seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            scale = 0.5 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1
            p.add_(torch.randn_like(p) * scale)
    return m


def batch(config, B, T, seed):
    rng = np.random.default_rng(seed)
    tokens, targets = rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))
    targets[rng.random((B, T)) < 0.2] = -1
    return tokens, targets


def parity(ref, dtype, tokens, targets):
    """(logits, loss, grads) of the torch reference and of our fused training path on its weights."""
    dev = ref.lm_head.weight.device
    ref.zero_grad()
    with torch.no_grad():
        logits_t = ref(torch.from_numpy(tokens).to(dev)).float().cpu().numpy()
    loss_t = ref(torch.from_numpy(tokens).to(dev), torch.from_numpy(targets).to(dev))
    loss_t.backward()
    grads_t = {k: p.grad.float().cpu().numpy() for k, p in ref.named_parameters()}
    params = jax.tree.map(jnp.asarray, params_from_state_dict(ref.state_dict(), ref.config))
    logits_j = jax.jit(lambda p, x: model.forward(p, x, ref.config, dtype=dtype))(params, tokens)
    loss_j, grads = jax.jit(jax.value_and_grad(
        lambda p, x, y: model.loss_fn(p, x, y, ref.config, dtype=dtype)))(params, tokens, targets)
    grads_j = {k: np.asarray(v, np.float32) for k, v in state_dict_from_params(grads, ref.config).items()}
    return (logits_t, loss_t.item(), grads_t), (np.asarray(logits_j), float(loss_j), grads_j)


def assert_grads_close(grads_j, grads_t, rel, floor_frac):
    """Each tensor within `rel` of torch's, above a floor of `floor_frac` of the global gradient norm
    (some scalars' true gradient is ~0 and then both sides hold only rounding)."""
    assert set(grads_j) == set(grads_t)
    floor = floor_frac * np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads_t.values()))
    for k in grads_t:
        err = np.linalg.norm(np.asarray(grads_j[k], np.float64) - grads_t[k])
        assert err <= rel * np.linalg.norm(grads_t[k]) + floor, (k, rel_err(grads_j[k], grads_t[k]))


@needs_torch
def test_bf16_forward_loss_and_grads_match_torch_on_device():
    """bf16 compute on both sides (cuDNN attention on a GPU): both round at different points,
    so the bars are bf16's: logits 2e-2 relative, loss 1e-2, the whole gradient 2e-2, and each
    tensor 5e-2 above a floor of 5e-3 of the global norm (the residual scalars' gradients
    are sums of ~1e5 bf16 products, small beside the matrices', and carry their rounding)."""
    ref = torch_model(CONFIG, 0, torch.bfloat16)
    tokens, targets = batch(CONFIG, 4, 256, 0)
    (logits_t, loss_t, grads_t), (logits_j, loss_j, grads_j) = parity(ref, jnp.bfloat16, tokens, targets)
    assert rel_err(logits_j, logits_t) <= 2e-2
    assert abs(loss_j - loss_t) <= 1e-2 * abs(loss_t)
    flat = lambda g: np.concatenate([g[k].ravel() for k in sorted(g)])  # noqa: E731
    assert rel_err(flat(grads_j), flat(grads_t)) <= 2e-2
    assert_grads_close(grads_j, grads_t, rel=5e-2, floor_frac=5e-3)


@needs_torch
def test_fp32_on_device_meets_the_cpu_bars():
    """fp32 on the device (full-precision matmuls, no TF32) against torch fp32: logits 1e-5
    relative, loss 1e-6, every gradient 1e-4 — the bars the CPU parity tests hold."""
    ref = torch_model(CONFIG, 1, torch.float32)
    tokens, targets = batch(CONFIG, 2, 256, 1)
    with jax.default_matmul_precision("highest"):
        (logits_t, loss_t, grads_t), (logits_j, loss_j, grads_j) = parity(ref, jnp.float32, tokens, targets)
    if ref.lm_head.weight.device.type == "cuda":  # torch's own CUDA fp32 may use TF32 in SDPA; check it too
        assert torch.backends.cuda.matmul.allow_tf32 is False
    assert rel_err(logits_j, logits_t) <= 1e-5
    assert abs(loss_j - loss_t) <= 1e-6 * max(1.0, abs(loss_t))
    assert_grads_close(grads_j, grads_t, rel=1e-4, floor_frac=1e-6)


def noisy_params(config, seed=0, scale=0.05):
    """Init params with every weight perturbed (init zeroes the projections), so all paths matter."""
    params = model.init_params(config, jax.random.key(seed), jnp.float32)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape).astype(a.dtype)),
                        params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_engine_greedy_equals_naive_generate_on_device(dtype):
    """The KV-cache engine's greedy tokens are the full forward's argmax, step by step. fp32: all
    40 tokens. bf16: the two paths round differently, so tokens must agree up to the first step
    whose top-2 margin in the naive logits is under 0.25 (after a near tie either choice is
    right); of five prompts the one with the longest such prefix is used, and it must be >= 4."""
    tok = ByteTokenizer()
    config = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=3, n_head=4, n_kv_head=2, n_embd=128,
                       window_pattern="SL")
    params = noisy_params(config)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 10  # wide gaps between the top two
    new = 40
    prompts = np.random.default_rng(1).integers(0, 256, (5, 6)).tolist()
    exact = jax.default_matmul_precision("highest") if dtype == jnp.float32 else contextlib.nullcontext()
    with exact:
        # one compile: the sequence is padded to a fixed length (causal, so the padding is never seen)
        fwd = jax.jit(lambda p, x, i: model.forward(p, x, config, dtype=dtype)[0, i])

        def naive(prompt):
            seq, margins = list(prompt), []
            for _ in range(new):
                padded = np.zeros((1, 64), np.int32)
                padded[0, :len(seq)] = seq
                logits = np.asarray(fwd(params, padded, len(seq) - 1), np.float64)
                top2 = np.sort(logits)[-2:]
                margins.append(top2[1] - top2[0])
                seq.append(int(np.argmax(logits)))
            sure = next((i for i, m in enumerate(margins) if m < 0.25), new) if dtype == jnp.bfloat16 else new
            return seq[len(prompt):], sure
        runs = [(naive(p), p) for p in prompts[: 1 if dtype == jnp.float32 else 5]]
        (want, sure), prompt = max(runs, key=lambda r: r[0][1])
        eng = scheduler.Engine(params, config, tok, dtype=dtype)
        got = [int(col[0]) for col, _ in eng.generate(prompt, max_tokens=new, temperature=0.0)]
    upto = min(sure, len(got))  # the engine stops early at a stop token; the naive loop does not
    assert upto >= (8 if dtype == jnp.float32 else 4), f"only {upto} comparable steps; the test lost its power"
    assert got[:upto] == want[:upto]


def test_sharded_train_step_equals_one_cpu_device():
    """One base_train step on a mesh over every default device (data and, where the device count
    allows, model axes) equals the same step on one CPU device: loss 1e-5, params 1e-4 (fp32)."""
    config = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
                       window_pattern="SL")
    n = jax.device_count()
    model_axis = 2 if n % 2 == 0 and n >= 4 else 1
    meshes = {"device": sharding.make_mesh(f"data={n // model_axis},model={model_axis}"),
              "cpu": sharding.make_mesh("data=1", devices=jax.devices("cpu")[:1])}
    rng = np.random.default_rng(0)
    B = 2 * (n // model_axis)
    tokens = rng.integers(0, config.vocab_size, (1, B, 65)).astype(np.int32)
    x, y = tokens[..., :-1], tokens[..., 1:]
    host = jax.device_get(noisy_params(config))  # no ~0 gradients: Adam's first step is their sign
    out = {}
    with jax.default_matmul_precision("highest"):
        for name, mesh in meshes.items():
            tx = optim.make_optimizer(config, 10, weight_decay=0.1, dtype=jnp.float32)
            state = init_train_state(config, tx, mesh, None, jnp.float32, params=host)
            step = make_train_step(config, tx, mesh, dtype=jnp.float32)
            state, metrics = step(state, x, y)
            out[name] = (float(metrics["loss"]), jax.device_get(state.params))
    (loss_d, p_d), (loss_c, p_c) = out["device"], out["cpu"]
    assert abs(loss_d - loss_c) <= 1e-5 * abs(loss_c)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p_d), jax.tree.leaves(p_c)):
        assert rel_err(a, b) <= 1e-4, jax.tree_util.keystr(path)
    moved = [rel_err(a, b) for a, b in zip(jax.tree.leaves(p_c), jax.tree.leaves(host))]
    assert max(moved) > 1e-3  # the step really changed the weights


def test_runs_where_it_says():
    """The kit's smoke mode runs these on CPU on purpose; anywhere else they must be on a GPU."""
    if os.environ.get("NANOCHAT_GPU_TESTS_ON_CPU") == "1":
        assert jax.default_backend() in ("cpu", "gpu")
    else:
        assert on_gpu()
