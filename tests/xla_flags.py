"""The XLA flags the suite runs under (conftest.py sets them; tests that start a subprocess with
their own device count use cpu_devices_flags so it keeps them).

LLVM at -O0: the test models are tiny, so compiling is most of the suite's time, and this cuts
it by about a quarter. XLA's own HLO passes (fusion, layout, the algebraic simplifier) still run
and the math is the same; the elementwise code rounds a little differently (≤ 1e-6 relative on
a 3-layer forward and gradient), so test_model.py also proves torch parity at XLA's default
level, the one users run (README, "Tests")."""

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def cpu_devices_flags(n: int) -> str:
    """XLA_FLAGS for a test's subprocess with n fake CPU devices."""
    return f"--xla_force_host_platform_device_count={n} {TEST_XLA_FLAGS}"
