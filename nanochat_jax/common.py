"""Process-wide policy: which dtype the model computes in, on which platform.

nanochat has one global COMPUTE_DTYPE instead of autocast. We do the same:
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
    """The activation dtype: NANOCHAT_DTYPE, else by platform."""
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


# ---- peak FLOPs and MFU ------------------------------------------------------

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


# ---- command-line entry points: one-line errors, clean stops ---------------------------------

def need(ok, msg: str) -> None:
    """A CLI's argument check: ValueError(msg) unless ok, which the CLI prints as its one-line error."""
    if not ok:
        raise ValueError(msg)


def one_line(e: BaseException) -> str:
    """A user-facing one-line reason for `e`: disk full names the file and the free space."""
    import errno
    import shutil

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = e.filename or "?"
        try:
            free = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(where)) or '.').free / 2**20:,.1f} MB free"
        except OSError:
            free = "free space unknown"
        return f"disk full writing {where} ({free})"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.strerror}: {e.filename}"
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    if text and (type(e).__module__.startswith("nanochat_jax") or isinstance(e, ValueError)):
        return text  # written for the user
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_cli(main, argv=None) -> int:
    """Runs a CLI main(argv): an unexpected exception becomes `error: <one line>` on stderr (exit 1) and
    Ctrl-C outside a training loop `interrupted` (exit 130); --debug (or NANOCHAT_DEBUG=1) keeps the
    traceback. SystemExit (the CLIs' own checked errors) passes through unchanged."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("NANOCHAT_DEBUG", "") not in ("", "0")
    try:
        out = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        import errno

        # our own error types and a full disk say all there is to say; anything else may be a bug
        known = type(e).__module__.startswith("nanochat_jax") or getattr(e, "errno", None) == errno.ENOSPC
        print(f"error: {one_line(e)}" + ("" if known else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 1
    return out if isinstance(out, int) else 0


class StopSignals:
    """SIGINT / SIGTERM during training: the first asks the loop to stop at the next step boundary
    (which saves a final checkpoint and exits); a second one exits at once. Orbax commits a step
    only when all of it is written, so exiting mid-save leaves the previous checkpoint in charge.

        with StopSignals() as stop:
            while ...:
                if stop.requested(): ...save, then raise SystemExit(stop.exit_code)
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        import signal

        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"{name} again: exiting now without a final checkpoint\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"{name}: stopping after this step with a final checkpoint ({name} again to exit at once)\n"
                 .encode())

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def requested(self) -> bool:
        """Whether any process got a stop signal (every process must agree, or one would save alone)."""
        flag = self.signum is not None
        if jax.process_count() == 1:
            return flag
        import numpy as np
        from jax.experimental import multihost_utils

        codes = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0)))
        if not flag and codes.max() > 0:
            self.signum = int(codes.max())
        return bool(codes.max() > 0)


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_bytes() -> tuple[int | None, str]:
    """(memory available to training across all devices, a description): each accelerator's
    allocator limit, or the host RAM for CPU devices (which all share it)."""
    devices = jax.devices()
    kind = f"{len(devices)} {devices[0].device_kind} device(s)"
    if devices[0].platform == "cpu":
        return host_memory_bytes(), f"{kind} sharing host memory"
    limits = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        limits.append((stats or {}).get("bytes_limit"))
    if any(v is None for v in limits):
        return None, kind
    return sum(limits), kind


# fp32 weights + gradients + optimizer state (Adam's two moments or Muon's momentum, ~2 on average)
TRAIN_BYTES_PER_PARAM = 16


def check_model_fits(num_params: int, what: str) -> None:
    """Raises ValueError when the weights, gradients and optimizer state alone exceed the devices'
    memory (activations come on top), instead of a long hang or an out-of-memory crash later."""
    need = num_params * TRAIN_BYTES_PER_PARAM
    have, where = device_memory_bytes()
    if have is not None and need > have:
        count = next(f"{num_params / v:,.1f}{u}" for v, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1, "")) if num_params >= v)
        raise ValueError(f"{what} has {count} parameters: weights, gradients and optimizer state need about "
                         f"{need / 2**30:,.1f} GiB, but the {where} have {have / 2**30:,.1f} GiB")
