"""Process-wide policy: which dtype the model computes in, on which platform.

nanochat has one global COMPUTE_DTYPE instead of autocast (spec §2). We do the same:
bf16 on GPUs with compute capability >= 8.0 and on TPU, fp32 on CPU and older GPUs,
and the env var NANOCHAT_DTYPE overrides it.
"""

from __future__ import annotations

import os
import re

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


# ---- peak FLOPs and MFU (spec §5.4) ------------------------------------------------------

# Dense (no 2:4 sparsity) bf16 FLOP/s of one JAX device: one GPU, or one TPU chip (v4, v5p
# megacore; v5e, v6e have one TensorCore). Vendor spec sheets; MFU is reported against bf16
# peak whatever the compute dtype, as upstream's "bf16_mfu".
PEAK_FLOPS = {
    "NVIDIA GB200": 2.5e15,
    "NVIDIA B200": 2.25e15,
    "NVIDIA GH200": 989e12,
    "NVIDIA H200 SXM": 989e12,
    "NVIDIA H200 NVL": 836e12,
    "NVIDIA H100 SXM": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6e": 918e12,
}

# (regex on the lower-cased jax device_kind, PEAK_FLOPS key): the first match wins, so
# variants precede their family. JAX calls v5e "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite".
_DEVICE_KINDS = (
    (r"\bgb200\b", "NVIDIA GB200"),
    (r"\bb200\b", "NVIDIA B200"),
    (r"\bgh200\b", "NVIDIA GH200"),
    (r"\bh200\b.*\bnvl\b", "NVIDIA H200 NVL"),
    (r"\bh200\b", "NVIDIA H200 SXM"),
    (r"\bh100\b.*\bnvl\b", "NVIDIA H100 NVL"),
    (r"\bh100\b.*\bpcie\b", "NVIDIA H100 PCIe"),
    (r"\bh100\b", "NVIDIA H100 SXM"),  # "NVIDIA H100 80GB HBM3"
    (r"\ba100\b", "NVIDIA A100"),  # SXM4 and PCIe: same tensor-core peak
    (r"^tpu v4$", "TPU v4"),  # not "TPU v4 lite" (v4i, a different chip)
    (r"^tpu v5( lite|e)$", "TPU v5e"),
    (r"^tpu v5p?$", "TPU v5p"),
    (r"^tpu v6( lite|e)$", "TPU v6e"),
)


def peak_flops(device=None) -> float | None:
    """bf16 peak FLOP/s of a jax Device or device_kind string (default: the first device).

    None for anything not in the table (CPU included), so MFU is left out rather than wrong.
    """
    kind = device if isinstance(device, str) else (device or jax.devices()[0]).device_kind
    kind = kind.strip().lower()
    for pattern, name in _DEVICE_KINDS:
        if re.search(pattern, kind):
            return PEAK_FLOPS[name]
    return None


def mfu(flops_per_token, tokens_per_step, step_seconds, n_devices, peak) -> float | None:
    """Model FLOPs utilization in percent: 100 · flops/token · tokens/step / dt / (peak · devices).

    None when the peak is unknown or dt is not positive (nothing meaningful to show).
    """
    if peak is None or step_seconds <= 0:
        return None
    return 100.0 * flops_per_token * tokens_per_step / step_seconds / (peak * n_devices)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_malloc() -> bool:
    """Make glibc keep freed host memory for reuse instead of returning it to the kernel.

    XLA:CPU allocates each step's temporaries (~1 GB at d4) fresh and frees them after;
    glibc serves that with mmap/munmap, so every step page-faults a gigabyte back in: 0.3 s
    of a 1.4 s d4 CPU step. One arena, no mmap, no trimming makes the step reuse the same
    pages. Call it before JAX starts its backend (its threads bind to arenas then).
    Returns whether it applied: not on non-glibc systems, or with NANOCHAT_MALLOC_TUNING=0.
    """
    if os.environ.get("NANOCHAT_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # present only in glibc  # noqa: B018
    except (OSError, AttributeError):
        return False
    return all(mallopt(opt, val) == 1 for opt, val in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
