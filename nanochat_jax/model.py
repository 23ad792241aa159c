"""nanochat's GPT (docs/numerics.md#model) as a Flax Linen module behind pure functions.

Linen gives us a plain nested-dict parameter pytree and a pure `apply`, so everything
that runs (`forward`, `loss_fn`, later `train_step` and the engine) is a function of
pytrees that jits with explicit shardings. Every parameter's logical axis names are
declared in AXES (`param_axes` gives the tree without tracing); sharding.py maps them onto a mesh.

Numerics follow upstream's dtype policy (docs/numerics.md#dtypes): matrices are fp32
masters cast to the activation dtype at use; `wte` and value-embedding tables are stored
in the compute dtype; RMSNorm has no weight and eps = finfo(input dtype).eps; the
softcap and the cross-entropy run in fp32.

Layout: kernels are Flax's (in, out). nanochat reasons in torch's (out, in);
`linear_fans` is the one place that says which axis is which.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nanochat_jax.attention import attention, cached_attention, resolve_backend
from nanochat_jax.common import resolve_dtype
from nanochat_jax.config import SMEAR_CHANNELS, VE_GATE_CHANNELS, GPTConfig
from nanochat_jax.sharding import constrain_activations

ROPE_BASE = 100_000.0
SOFTCAP = 15.0
QK_SCALE = 1.2
IGNORE_INDEX = -1


def linear_fans(kernel_shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a Flax kernel stored (in, out); torch's weight is its transpose."""
    fan_in, fan_out = kernel_shape[-2], kernel_shape[-1]
    return fan_in, fan_out


# Logical axes of each parameter, by its name in the tree (a block's by "attn/..", "mlp/.."):
# sharding.RULES maps them onto mesh axes. The modules box their params with these names.
AXES = {
    "wte": ("vocab", "embed"), "ve": ("ve_vocab", "kv_heads"), "lm_head": ("embed", "vocab"),
    "lambda": (None,), "smear_gate": (None, None), "attn/ve_gate": (None, None),
    "attn/c_q": ("embed", "heads"), "attn/c_k": ("embed", "kv_heads"), "attn/c_v": ("embed", "kv_heads"),
    "attn/c_proj": ("heads", "embed"), "mlp/c_fc": ("embed", "mlp"), "mlp/c_proj": ("mlp", "embed"),
}


# ---- initializers (docs/numerics.md#init) ---------------------------------------------

def _uniform(lo, hi):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, lo, hi).astype(dtype)
    return init


def _normal(std):
    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return init


def _ramp(start, end):
    """Per-layer scalars: a linear ramp from `start` (layer 0) to `end` (last layer)."""
    def init(key, shape, dtype=jnp.float32):
        (n,) = shape
        return (start + (end - start) * jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1)).astype(dtype)
    return init


def _const(value):
    def init(key, shape, dtype=jnp.float32):
        return jnp.full(shape, value, dtype)
    return init


# ---- layers ----------------------------------------------------------------------------

def rms_norm(x):
    """F.rms_norm without weight: fp32 math, eps = finfo(x.dtype).eps, result in x.dtype."""
    eps = jnp.finfo(x.dtype).eps
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rotary_tables(pos_BT, head_dim: int, dtype):
    """cos/sin of shape (B, T, head_dim/2) at each token's position, computed in fp32 then cast, as upstream does."""
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = pos_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def apply_rotary(x_BTHD, cos_BTD, sin_BTD):
    """Half-split pairing with nanochat's sign (a rotation by -θ)."""
    d = x_BTHD.shape[-1] // 2
    x1, x2 = x_BTHD[..., :d], x_BTHD[..., d:]
    cos, sin = cos_BTD[:, :, None, :], sin_BTD[:, :, None, :]
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


class KVCache(NamedTuple):
    """What decoding remembers of each row. Per layer one (row, kv head, position, head dim) buffer:
    decode attention batches over contiguous blocks and reads a layer in place (docs/numerics.md#generation)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths_B: jax.Array  # int32 tokens cached per row: the position of the row's next token
    prev_BC: jax.Array  # normalized pre-smear embedding of the last cached token (the smear's left neighbour)


class Linear(nn.Module):
    """Bias-free linear with an fp32 master kernel (in, out), cast to x's dtype at use."""

    features: int
    axes: tuple
    init: object

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(self.init, self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        # One 2-D GEMM over all leading dims: XLA:CPU runs the backward of a (B, T, C) dot
        # contracting two dims ~2x slower than the same product on (B·T, C).
        x_NC = x.reshape(-1, x.shape[-1])
        if hasattr(kernel, "qvalue"):  # an int8 QArray from serving's --quantize (nanochat_jax/quantize.py)
            from nanochat_jax.quantize import dot
            y = dot(x_NC, kernel)
        else:
            y = x_NC @ kernel.astype(x.dtype)
        return y.reshape(*x.shape[:-1], self.features)


class Attention(nn.Module):
    config: GPTConfig
    layer: int
    backend: str

    @nn.compact
    def __call__(self, x_BTC, ve_BTK, cos_BTD, sin_BTD, kv=None, pos_BT=None, write_BT=None):
        """kv: this layer's (k, v) cache; queries at pos_BT read it and the new k/v, which then go to
        write_BT (out of range: dropped)."""
        cfg = self.config
        B, T, C = x_BTC.shape
        H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        s = math.sqrt(3) * C ** -0.5
        q = Linear(H * hd, AXES["attn/c_q"], _uniform(-s, s), name="c_q")(x_BTC).reshape(B, T, H, hd)
        k = Linear(Hkv * hd, AXES["attn/c_k"], _uniform(-s, s), name="c_k")(x_BTC).reshape(B, T, Hkv, hd)
        v = Linear(Hkv * hd, AXES["attn/c_v"], _uniform(-s, s), name="c_v")(x_BTC).reshape(B, T, Hkv, hd)
        if ve_BTK is not None:  # ResFormer value residual, gated per kv head in (0, 3)
            gate = Linear(Hkv, AXES["attn/ve_gate"], _uniform(0.0, 0.02), name="ve_gate")(x_BTC[..., :VE_GATE_CHANNELS])
            v = v + (3 * jax.nn.sigmoid(gate))[..., None] * ve_BTK.reshape(B, T, Hkv, hd)
        q, k = apply_rotary(q, cos_BTD, sin_BTD), apply_rotary(k, cos_BTD, sin_BTD)
        q, k = rms_norm(q) * QK_SCALE, rms_norm(k) * QK_SCALE
        window = cfg.window_sizes[self.layer]
        if kv is None:
            y = attention(q, k, v, window_left=window, backend=self.backend)
        else:
            y = cached_attention(q, *kv, k, v, pos_BT, window_left=window).astype(x_BTC.dtype)
            row_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
            # The write reads the attention output (a NaN row writes nothing, which never happens
            # otherwise) so XLA orders the cache reads before the in-place write: without a data
            # dependence it copied every layer's cache (two copies each per step).
            write_BT = jnp.where(jnp.isnan(y[:, :, 0, 0]), kv[0].shape[2], write_BT)
            # Advanced indices around a slice: the indexed view is (B, T, Hkv, hd), k's own shape.
            kv = tuple(c.at[row_BT, :, write_BT].set(new.astype(c.dtype), mode="drop") for c, new in zip(kv, (k, v)))
        return Linear(C, AXES["attn/c_proj"], nn.initializers.zeros, name="c_proj")(y.reshape(B, T, H * hd)), kv


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x_BTC):
        C = x_BTC.shape[-1]
        s = math.sqrt(3) * C ** -0.5
        h = Linear(4 * C, AXES["mlp/c_fc"], _uniform(-0.4 * s, 0.4 * s), name="c_fc")(x_BTC)
        h = jnp.square(jax.nn.relu(h))
        return Linear(C, AXES["mlp/c_proj"], nn.initializers.zeros, name="c_proj")(h)


class Block(nn.Module):
    config: GPTConfig
    layer: int
    backend: str

    @nn.compact
    def __call__(self, x_BTC, ve_BTK, cos_BTD, sin_BTD, *cached):
        y, kv = Attention(self.config, self.layer, self.backend, name="attn")(rms_norm(x_BTC), ve_BTK, cos_BTD, sin_BTD,
                                                                              *cached)
        x_BTC = x_BTC + y
        return x_BTC + MLP(name="mlp")(rms_norm(x_BTC)), kv


class GPT(nn.Module):
    """tokens (B, T) int → fp32 softcapped logits (B, T, vocab_size)."""

    config: GPTConfig
    dtype: jnp.dtype = jnp.float32
    backend: str = "xla"

    def _param(self, name, init, shape, axes, dtype=jnp.float32):
        return self.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)

    @nn.compact
    def __call__(self, tokens_BT, head: bool = True, cache: KVCache | None = None, n_new_B=None,
                 last_only: bool = False):
        """head=False returns the final normed hidden states (B, T, C) instead of logits.

        With a cache, token t of a row sits at position cache.lengths_B + t and only the first
        n_new_B are real (padding and idle rows write nothing); returns (logits, updated cache).
        last_only: logits (B, 1, V) of each row's last real token only (prefill skips the head elsewhere).
        """
        cfg, cd = self.config, self.dtype
        B, T = tokens_BT.shape
        C, L, Vp = cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size
        s = math.sqrt(3) * C ** -0.5
        wte = self._param("wte", _normal(0.8), (Vp, C), AXES["wte"], cd)
        resid_lambdas = self._param("resid_lambdas", _ramp(1.15, 1.05), (L,), AXES["lambda"])
        x0_lambdas = self._param("x0_lambdas", _ramp(0.20, 0.05), (L,), AXES["lambda"])
        smear_lambda = self._param("smear_lambda", _const(0.0), (1,), AXES["lambda"])
        backout_lambda = self._param("backout_lambda", _const(0.2), (1,), AXES["lambda"])
        smear_gate = Linear(1, AXES["smear_gate"], _uniform(0.0, 0.02), name="smear_gate")

        x = rms_norm(wte[tokens_BT].astype(cd))
        # Smear: mix the previous token's embedding into each position (a cheap bigram).
        if cache is None:
            pos_BT = jnp.arange(T)[None]
            gate_BT1 = smear_lambda.astype(cd) * jax.nn.sigmoid(smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            x = jnp.concatenate([x[:, :1], x[:, 1:] + gate_BT1 * x[:, :-1]], axis=1)
        else:  # position 0 of a chunk takes its neighbour from the cache; position 0 of a sequence has none
            pos_BT = cache.lengths_B[:, None] + jnp.arange(T)[None]
            last_B = jnp.maximum(n_new_B - 1, 0)
            prev_BC = jnp.where((n_new_B > 0)[:, None], x[jnp.arange(B), last_B], cache.prev_BC.astype(cd))
            prev_BTC = jnp.concatenate([cache.prev_BC.astype(cd)[:, None], x[:, :-1]], axis=1)
            gate_BT1 = smear_lambda.astype(cd) * jax.nn.sigmoid(smear_gate(x[..., :SMEAR_CHANNELS]))
            x = jnp.where((pos_BT > 0)[..., None], x + gate_BT1 * prev_BTC, x)
            # Index S (the cache length) is out of range: the scatter drops it.
            write_BT = jnp.where(jnp.arange(T)[None] < n_new_B[:, None], pos_BT, cache.k[0].shape[2])
            k_cache, v_cache = list(cache.k), list(cache.v)
        x = constrain_activations(x)
        x0 = x

        cos, sin = rotary_tables(pos_BT, cfg.head_dim, cd)
        x_backout = None
        for i in range(L):
            x = resid_lambdas[i].astype(cd) * x + x0_lambdas[i].astype(cd) * x0
            ve = None
            if cfg.has_ve(i):
                table = self._param(f"ve_{i}", _uniform(-s, s), (Vp, cfg.kv_dim), AXES["ve"], cd)
                ve = table[tokens_BT].astype(cd)
            cached = () if cache is None else ((k_cache[i], v_cache[i]), pos_BT, write_BT)
            x, kv = Block(cfg, i, self.backend, name=f"h_{i}")(x, ve, cos, sin, *cached)
            x = constrain_activations(x)
            if cache is not None:
                k_cache[i], v_cache[i] = kv
            if i == cfg.backout_layer:
                x_backout = x
        if last_only:
            x, x_backout = (a[jnp.arange(B), last_B][:, None] for a in (x, x_backout))
        x = x - backout_lambda.astype(cd) * x_backout
        x = rms_norm(x)
        if not head:
            return x
        logits = Linear(Vp, AXES["lm_head"], _normal(0.001), name="lm_head")(x)
        logits = logits[..., :cfg.vocab_size].astype(jnp.float32)
        logits = SOFTCAP * jnp.tanh(logits / SOFTCAP)
        if cache is None:
            return logits
        return logits, KVCache(tuple(k_cache), tuple(v_cache), cache.lengths_B + n_new_B, prev_BC)


# ---- the functional boundary -----------------------------------------------------------

def _module(config, dtype=None, backend=None) -> GPT:
    dtype = resolve_dtype(dtype)
    return GPT(config, dtype=dtype, backend=resolve_backend(backend, dtype))


def init_params(config: GPTConfig, key, dtype=None) -> dict:
    """Fresh parameters (upstream's init, docs/numerics.md#init) as a plain nested dict of arrays."""
    module = _module(config, dtype, "xla")
    return jax.jit(lambda k: nn.meta.unbox(module.init(k, jnp.zeros((1, 2), jnp.int32))["params"]))(key)


def param_axes(config: GPTConfig) -> dict:
    """A pytree like the params whose leaves are PartitionSpecs of logical axis names, from AXES (no tracing)."""
    def linears(part, names):
        return {name: {"kernel": P(*AXES[f"{part}{name}"])} for name in names}

    def block(i):
        attn = ("c_q", "c_k", "c_v", "c_proj") + (("ve_gate",) if config.has_ve(i) else ())
        return {"attn": linears("attn/", attn), "mlp": linears("mlp/", ("c_fc", "c_proj"))}

    lambdas = dict.fromkeys(("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"), P(*AXES["lambda"]))
    return {"wte": P(*AXES["wte"]), **lambdas, **linears("", ("lm_head", "smear_gate")),
            **{f"ve_{i}": P(*AXES["ve"]) for i in config.ve_layers}, **{f"h_{i}": block(i) for i in range(config.n_layer)}}


def forward(params, tokens_BT, config: GPTConfig, *, dtype=None, backend=None, cache: KVCache | None = None,
            n_new_B=None, last_only: bool = False):
    """Pure forward: fp32 softcapped logits (B, T, vocab_size); with a cache, (logits, cache) (GPT.__call__)."""
    return _module(config, dtype, backend).apply({"params": params}, tokens_BT, cache=cache, n_new_B=n_new_B,
                                                 last_only=last_only)


def cross_entropy(logits_BTV, targets_BT, reduction: str = "mean"):
    """fp32 cross-entropy with ignore index -1.

    'mean' averages over non-ignored targets (0 if all are ignored, where torch would give
    NaN: a fully masked SFT micro-batch must not poison training); 'none' returns a flat
    (B·T,) vector with 0 at ignored positions, like torch.
    """
    _check_reduction(reduction)
    logits = logits_BTV.astype(jnp.float32)
    valid = targets_BT != IGNORE_INDEX
    safe = jnp.where(valid, targets_BT, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return _reduce(logz - picked, valid, reduction)


def _check_reduction(reduction: str):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _reduce(nll, valid, reduction: str):
    """Zero the ignored positions, then flat (B·T,) / sum / mean over the valid ones."""
    nll = jnp.where(valid, nll, 0.0).reshape(-1)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / jnp.maximum(valid.sum(), 1)


def _softcap_nll_parts(x_NC, w_CV, targets_N):
    z_NV = x_NC @ w_CV  # in the compute dtype, as model.Linear
    zf_NV = z_NV.astype(jnp.float32)
    # |softcap| <= 15, so exp cannot overflow: no max pass is needed for the logsumexp.
    logz_N = jnp.log(jnp.sum(jnp.exp(SOFTCAP * jnp.tanh(zf_NV / SOFTCAP)), axis=-1))
    z_N = jnp.take_along_axis(zf_NV, targets_N[:, None], axis=-1)[:, 0]
    return logz_N - SOFTCAP * jnp.tanh(z_N / SOFTCAP), zf_NV, logz_N


def _xt_dot(x_NC, y_NV):
    """x.T @ y. XLA:CPU runs a dot contracting both operands' leading axis ~1.4x slower than
    when it has to lay x.T out row-major first, which contracting over two axes makes it do."""
    n = x_NC.shape[0]
    k = 2 if n % 2 == 0 else 1
    return jnp.einsum("knc,knv->cv", x_NC.reshape(k, n // k, -1), y_NV.reshape(k, n // k, -1))


@jax.custom_vjp
def softcap_nll(x_NC, w_CV, targets_N):
    """Per-row CE of softcap(x @ w) against targets (all valid ids): the head and the loss fused.

    Equal to cross_entropy(forward(...)) but with one vocab-sized pass forward (logsumexp);
    under autodiff the forward also writes the backward's vocab-sized factor D = ∂nll/∂z
    (the cotangent only scales its rows), so no (N, V) logits are kept and the backward is
    one GEMM. Autodiff of the plain expression writes five (N, V) temporaries; on CPU the
    head dominates the step.
    """
    return _softcap_nll_parts(x_NC, w_CV, targets_N)[0]


def _softcap_nll_fwd(x_NC, w_CV, targets_N):
    nll_N, zf_NV, logz_N = _softcap_nll_parts(x_NC, w_CV, targets_N)
    t_NV = jnp.tanh(zf_NV / SOFTCAP)
    onehot_NV = jnp.arange(zf_NV.shape[-1])[None, :] == targets_N[:, None]
    d_NV = ((jnp.exp(SOFTCAP * t_NV - logz_N[:, None]) - onehot_NV) * (1 - t_NV * t_NV)).astype(x_NC.dtype)
    return nll_N, (x_NC, d_NV, d_NV @ w_CV.T)


def _softcap_nll_bwd(res, g_N):
    x_NC, d_NV, dx_NC = res
    scale = lambda a_NC: (g_N[:, None] * a_NC.astype(jnp.float32)).astype(a_NC.dtype)  # noqa: E731
    return scale(dx_NC), _xt_dot(scale(x_NC), d_NV), None


softcap_nll.defvjp(_softcap_nll_fwd, _softcap_nll_bwd)


def loss_fn(params, tokens_BT, targets_BT, config: GPTConfig, *, reduction="mean", dtype=None, backend=None):
    """cross_entropy(forward(...)) with the head fused into the loss (softcap_nll)."""
    _check_reduction(reduction)
    x_BTC = _module(config, dtype, backend).apply({"params": params}, tokens_BT, head=False)
    w_CV = params["lm_head"]["kernel"][:, :config.vocab_size].astype(x_BTC.dtype)
    valid = (targets_BT != IGNORE_INDEX).reshape(-1)
    nll = softcap_nll(x_BTC.reshape(-1, x_BTC.shape[-1]), w_CV, jnp.where(valid, targets_BT.reshape(-1), 0))
    return _reduce(nll, valid, reduction)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "backend", "top_k", "greedy"))
def _next_token(params, buf_1T, pos, key, temperature, *, config, dtype, backend, top_k, greedy):
    logits = forward(params, buf_1T, config, dtype=dtype, backend=backend)[0, pos - 1]
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if greedy:
        return jnp.argmax(logits)
    return jax.random.categorical(key, logits / temperature)


def generate(params, tokens: list[int], config: GPTConfig, max_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 42, dtype=None, backend=None):
    """Naive sampling (upstream's cache-free generate): a full forward per token, yielding token ids.

    The sequence lives in a fixed buffer (length rounded up to a multiple of 128) so one
    compile serves many prompts; causal attention makes the padding after the cursor
    invisible. The KV-cache engine is the fast path; this is the simple reference.
    """
    if not tokens:
        raise ValueError("generate needs at least one prompt token")
    need = len(tokens) + max_tokens
    limit = 10 * config.sequence_len
    if need > limit:
        raise ValueError(f"prompt + max_tokens = {need} exceeds the rotary range 10·sequence_len = {limit}")
    buf_len = min(-(-need // 128) * 128, limit)
    dtype = resolve_dtype(dtype)
    backend = resolve_backend(backend, dtype)
    buf = jnp.zeros((1, buf_len), jnp.int32).at[0, :len(tokens)].set(jnp.asarray(tokens, jnp.int32))
    key = jax.random.key(seed)
    for pos in range(len(tokens), need):
        key, sub = jax.random.split(key)
        nxt = _next_token(params, buf, pos, sub, temperature, config=config, dtype=dtype, backend=backend,
                          top_k=top_k, greedy=temperature == 0.0)
        buf = buf.at[0, pos].set(nxt)
        yield int(nxt)
