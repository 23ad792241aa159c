"""Process-wide policy: which dtype the model computes in, on which platform.

nanochat has one global COMPUTE_DTYPE instead of autocast (spec §2). We do the same:
bf16 on GPUs with compute capability >= 8.0 and on TPU, fp32 on CPU and older GPUs,
and the env var NANOCHAT_DTYPE overrides it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def platform() -> str:
    """'cpu', 'gpu' or 'tpu' for the default JAX backend."""
    return jax.default_backend()


def compute_dtype() -> jnp.dtype:
    """The activation dtype (spec §2): NANOCHAT_DTYPE, else by platform."""
    name = os.environ.get("NANOCHAT_DTYPE")
    if name:
        if name not in DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE={name!r} is not one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[name])
    plat = platform()
    if plat == "tpu":
        return jnp.dtype(jnp.bfloat16)
    if plat == "gpu":
        cc = getattr(jax.devices()[0], "compute_capability", "0")
        return jnp.dtype(jnp.bfloat16 if float(cc) >= 8.0 else jnp.float32)
    return jnp.dtype(jnp.float32)


def resolve_dtype(dtype) -> jnp.dtype:
    """None → compute_dtype(); a name or dtype → that dtype."""
    if dtype is None:
        return compute_dtype()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)
