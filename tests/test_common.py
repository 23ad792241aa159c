"""Process-wide policy in nanochat_jax.common: the host allocator tuning."""

import json
import os
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import ctypes, json, resource
from nanochat_jax.common import tune_malloc

applied = tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # noqa: E731
size = 256 << 20  # (not numpy: it asks for huge pages, XLA's buffers do not)
p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
before = faults()
p = libc.malloc(size); ctypes.memset(p, 1, size)  # the same size again: fresh pages, or the freed ones?
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def run_child(**env):
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_malloc_reuses_freed_memory_instead_of_faulting_it_back():
    # Untuned, glibc maps a 256 MiB block fresh and the kernel faults in all 65,536 pages;
    # that is what XLA:CPU's per-step temporaries paid every training step.
    off = run_child(NANOCHAT_MALLOC_TUNING="0")
    on = run_child()
    assert off["applied"] is False and off["faults"] > 30_000
    assert on["applied"] is True and on["faults"] < 1_000
