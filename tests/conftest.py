"""Every test sees 8 fake CPU devices (set before JAX initializes) and the default (platform) compute dtype;
NANOCHAT_DTYPE is cleared. XLA compiles without LLVM's optimizations (xla_flags.py: compiling is
most of the suite's time)."""

import os

from xla_flags import TEST_XLA_FLAGS

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.pop("NANOCHAT_DTYPE", None)

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("nanochat", deadline=None, print_blob=True, derandomize=True)
settings.load_profile("nanochat")


@pytest.fixture(autouse=True)
def no_leaked_compile_cache():
    """A training CLI run in-process turns JAX's persistent compilation cache on for the rest of
    the process (loop.start_run); turn it back off after the test, so later tests neither read
    nor write it (XLA:CPU once crashed serializing an unrelated test's executable into it)."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    yield
    if jax.config.jax_compilation_cache_dir != before:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


def pytest_collection_modifyitems(config, items):
    """GPU/TPU-marked tests skip cleanly where that accelerator is absent. NANOCHAT_GPU_TESTS_ON_CPU=1
    (the GPU proof kit's --cpu-smoke) runs the GPU-marked tests on CPU; those that need CUDA itself
    skip on their own."""
    plat = jax.default_backend()
    gpu_on_cpu = os.environ.get("NANOCHAT_GPU_TESTS_ON_CPU") == "1" and plat == "cpu"
    for item in items:
        for mark, want in (("gpu", "gpu"), ("tpu", "tpu")):
            if mark == "gpu" and gpu_on_cpu:
                continue
            if mark in item.keywords and plat != want:
                item.add_marker(pytest.mark.skip(reason=f"needs a {want.upper()} (JAX backend is {plat})"))
