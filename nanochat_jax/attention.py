"""Causal sliding-window attention behind one function, with three backends.

- "xla": `jax.nn.dot_product_attention` on the XLA path. It materializes the T×T
  scores, so it is the reference (and the CPU path), not the fast path.
- "cudnn": cuDNN flash attention on GPU (bf16/fp16 only; causal + left window).
- "splash": the TPU Pallas splash-attention kernel, wrapped in `jax.shard_map` when a
  mesh is active (Mosaic kernels are not auto-partitioned). "splash-interpret" runs the
  same kernel in Pallas interpret mode so its numerics can be tested on CPU.

Window semantics are flash-attn's (nanochat's): query i sees keys j with
i - left <= j <= i. Inputs are (B, T, heads, head_dim); GQA is supported (k/v may have
fewer heads, dividing the query heads). The softmax scale is 1/sqrt(head_dim).
`cached_attention` is the decode-time form of the same rule over a KV cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nanochat_jax.sharding import BATCH

BACKENDS = ("xla", "cudnn", "splash", "splash-interpret")
SPLASH_BLOCK = 128  # splash tiles the sequence in multiples of the TPU lane width


def default_backend(dtype) -> str:
    """The fastest backend that runs here for this compute dtype."""
    plat = jax.default_backend()
    if plat == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if plat == "tpu":
        return "splash"
    return "xla"


def resolve_backend(name: str | None, dtype) -> str:
    """'auto'/None → default_backend; an explicit name is checked to be usable here."""
    if name in (None, "auto"):
        return default_backend(dtype)
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {('auto',) + BACKENDS}")
    plat = jax.default_backend()
    if name == "cudnn":
        if plat != "gpu":
            raise ValueError(f"attention backend 'cudnn' needs a CUDA GPU, but JAX is running on {plat!r}; use 'xla'")
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention backend 'cudnn' needs bf16/fp16 inputs, got {jnp.dtype(dtype).name}; "
                             "set NANOCHAT_DTYPE=bfloat16 or use 'xla'")
    if name == "splash" and plat != "tpu":
        raise ValueError(f"attention backend 'splash' needs a TPU, but JAX is running on {plat!r}; "
                         "use 'splash-interpret' to run the kernel in interpret mode (slow, for tests) or 'xla'")
    return name


def attention(q_BTHD, k_BTKD, v_BTKD, *, window_left: int, backend: str = "xla"):
    """Causal attention where query i attends keys max(0, i - window_left)..i."""
    T = q_BTHD.shape[1]
    # A window covering the whole sequence is plain causal attention; saying so lets the
    # kernels skip mask bookkeeping.
    window = None if window_left >= T - 1 else (window_left, 0)
    if backend in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=True, local_window_size=window,
                                            implementation=backend)
    if backend in ("splash", "splash-interpret"):
        return _splash(q_BTHD, k_BTKD, v_BTKD, window_left=window_left, interpret=backend == "splash-interpret")
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def cached_attention(q_BTHD, k_BKSD, v_BKSD, k_BTKD, v_BTKD, pos_BT, *, window_left: int):
    """Decode-time attention: queries at positions pos_BT = cached length + t see the row's old
    cache (B, kv head, S, D) below its length plus the chunk's own new k/v (B, T, kv head, D),
    under the training rule p - window_left <= j <= p. Returns (B, T, H, D).

    The new columns are attended apart from the cache so the cache is only read before this
    step's write: reading the freshly written buffer made XLA:CPU copy the whole cache for
    each layer (32 cache-sized copies a step at one row, d4). Both cache einsums batch over
    contiguous (b, k) blocks: XLA:CPU runs them as small GEMMs without first transposing
    the cache, which at 32 rows cost 7x the attention itself.
    """
    B, T, H, D = q_BTHD.shape
    K, G, S = k_BKSD.shape[1], H // k_BKSD.shape[1], k_BKSD.shape[2]
    q_BKQD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)  # Q = (g, t)
    k_BKTD, v_BKTD = k_BTKD.transpose(0, 2, 1, 3), v_BTKD.transpose(0, 2, 1, 3)
    s_BKQS = jnp.einsum("bkqd,bksd->bkqs", q_BKQD, k_BKSD, preferred_element_type=jnp.float32)
    s_BKQT = jnp.einsum("bkqd,bktd->bkqt", q_BKQD, k_BKTD, preferred_element_type=jnp.float32)
    s_BKQX = jnp.concatenate([s_BKQS, s_BKQT], axis=-1) * D ** -0.5  # X = S cached + T new columns
    pos_BQ = jnp.broadcast_to(pos_BT[:, None], (B, G, T)).reshape(B, G * T)
    key_BX = jnp.concatenate([jnp.broadcast_to(jnp.arange(S), (B, S)), pos_BT], axis=1)  # each column's position
    live_BX = jnp.concatenate([jnp.arange(S)[None] < pos_BT[:, :1], jnp.ones((B, T), bool)], axis=1)
    ok_BQX = (live_BX[:, None] & (key_BX[:, None] <= pos_BQ[..., None])
              & (key_BX[:, None] >= pos_BQ[..., None] - window_left))
    s_BKQX = jnp.where(ok_BQX[:, None], s_BKQX, jnp.finfo(jnp.float32).min)
    p_BKQX = jax.nn.softmax(s_BKQX, axis=-1).astype(v_BKSD.dtype)
    y_BKQD = (jnp.einsum("bkqs,bksd->bkqd", p_BKQX[..., :S], v_BKSD)
              + jnp.einsum("bkqt,bktd->bkqd", p_BKQX[..., S:], v_BKTD.astype(v_BKSD.dtype)))
    return y_BKQD.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


# ---- splash (TPU Pallas) -------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _splash_kernel(n_heads: int, T: int, window_left: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if window_left >= T - 1:
        head_mask = sm.CausalMask((T, T))
    else:
        head_mask = sm.LocalMask((T, T), (window_left, 0), offset=0)
    b = min(512, T)
    blocks = sk.BlockSizes(block_q=b, block_kv_compute=b, block_kv=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([head_mask] * n_heads)
    # The kernel holds mask-info arrays; build them concretely even when first asked for
    # inside a trace, so the cached kernel never captures a tracer.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q_BTHD, k_BTHD, v_BTHD, *, window_left: int, interpret: bool):
    """Splash on one device's shard: (B, T, H, D) in and out."""
    B, T, H, D = q_BTHD.shape
    kernel = _splash_kernel(H, T, window_left, interpret)
    q_BHTD = jnp.swapaxes(q_BTHD * (D ** -0.5), 1, 2)  # the kernel applies no softmax scale
    out_BHTD = jax.vmap(kernel)(q_BHTD, jnp.swapaxes(k_BTHD, 1, 2), jnp.swapaxes(v_BTHD, 1, 2))
    return jnp.swapaxes(out_BHTD, 1, 2)


def _splash(q_BTHD, k_BTKD, v_BTKD, *, window_left: int, interpret: bool):
    T, H = q_BTHD.shape[1], q_BTHD.shape[2]
    if T % SPLASH_BLOCK:
        raise ValueError(f"splash attention needs the sequence length to be a multiple of {SPLASH_BLOCK}, got {T}; "
                         "use the 'xla' backend for this shape")
    groups = H // k_BTKD.shape[2]
    if groups > 1:  # GQA: share each kv head with its query group (the MHA kernel wants equal heads)
        k_BTKD, v_BTKD = jnp.repeat(k_BTKD, groups, axis=2), jnp.repeat(v_BTKD, groups, axis=2)
    fn = functools.partial(_splash_local, window_left=window_left, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q_BTHD, k_BTKD, v_BTKD)
    # Mosaic kernels are not auto-partitioned: run one kernel per device on its own batch
    # rows and heads. Axes the mesh does not have are dropped from the PartitionSpec.
    batch_axes = tuple(a for a in BATCH if a in mesh.axis_names) or None
    head_axis = "model" if "model" in mesh.axis_names else None
    spec = P(batch_axes, None, head_axis, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        q_BTHD, k_BTKD, v_BTKD)
