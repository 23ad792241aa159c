"""The GPU proof kit (bench/gpu_proof.sh): its --cpu-smoke end to end, and its phase runner."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_proof
from test_bench_upstream import fake_checkout
from xla_flags import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def read_results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cpu_smoke_runs_every_phase_end_to_end(tmp_path):
    """With an upstream checkout (a fake one: upstream's own code is tested in test_bench_upstream.py)
    passed through to the decode phase and its own training phase."""
    env = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_GPU_TESTS_ON_CPU", "NANOCHAT_SRC")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}"  # the kit drops the count
    src = fake_checkout(tmp_path / "nanochat", {"1": [0] * 8, "2": [0] * 8})
    out = tmp_path / "out"
    r = subprocess.run(["bash", "bench/gpu_proof.sh", str(out), "--cpu-smoke", "--budget-s", "1500",
                        "--nanochat-src", str(src)],
                       cwd=ROOT, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = read_results(out)
    status = {x["phase"]: x for x in rows if x.get("kit") == "status"}
    has_torch = importlib.util.find_spec("torch") is not None
    want = ["env", "tests", "train_jax", "compile_warm", "decode"] + (["train_upstream", "train_torch"] if has_torch
                                                                      else [])
    assert list(status) == want and all(status[p]["status"] == "ok" for p in want), status
    assert all(x["smoke"] for x in status.values())
    assert all(x["nanochat_src"] == str(src.resolve()) for x in status.values())

    env_row = next(x for x in rows if x["phase"] == "env" and "backend" in x)
    assert env_row["backend"] == "cpu" and env_row["python"] == ".".join(map(str, sys.version_info[:3]))
    assert len(env_row["devices"]) == 1  # the fake-device count was dropped, like the host's one GPU
    # the gpu-marked tests really ran on CPU (the cuDNN ones skip), none failed
    t = status["tests"]
    assert t["failed"] == 0 and t["errors"] == 0 and t["passed"] >= (6 if has_torch else 4) and t["skipped"] >= 3

    (jax_row,) = [x for x in rows if x["phase"] == "train_jax" and "step_s" in x]
    assert jax_row["framework"] == "jax" and jax_row["depth"] == 2 and jax_row["tok_per_s"] > 0
    assert jax_row["cache_files_after"] > jax_row["cache_files_before"]  # the cold step compile adds to the cache
    (warm,) = [x for x in rows if x["phase"] == "compile_warm" and "step_s" in x]
    assert warm["cache_files_before"] == warm["cache_files_after"] > 0  # a fresh process compiled nothing anew
    impls = {(x["impl"], x["batch"]) for x in rows if x["phase"] == "decode" and "impl" in x}
    assert {("jax-engine", 1), ("jax-engine-samples", 2), ("jax-scheduler", 4)} <= impls
    if has_torch:
        (torch_row,) = [x for x in rows if x["phase"] == "train_torch" and "step_s" in x]
        assert torch_row["framework"] == "torch_ref" and torch_row["tok_per_s"] > 0
        assert {("upstream-engine", 1), ("upstream-engine", 2)} <= impls
        (ratios,) = [x for x in rows if x["phase"] == "decode" and "summary" in x]
        assert ratios["batch1"]["ours_over_upstream"] > 0
        (up_row,) = [x for x in rows if x["phase"] == "train_upstream" and "step_s" in x]
        assert up_row["framework"] == "upstream" and up_row["depth"] == 2 and up_row["tok_per_s"] > 0
    summary = (out / "summary.txt").read_text()
    assert "train_jax" in summary and "jax-scheduler" in summary
    assert not has_torch or ("upstream-engine" in summary and "train_upstream" in summary)
    assert (out / "gpu_tests.xml").is_file() and "===== decode" in (out / "log.txt").read_text()


def test_a_phase_past_its_cap_is_killed_and_recorded(tmp_path):
    argv = [sys.executable, "-c", "import json, time; print(json.dumps({'x': 1}), flush=True); time.sleep(60)"]
    with open(tmp_path / "log", "w") as log, open(tmp_path / "res", "w") as res:
        status, rows = gpu_proof.run_phase("slowpoke", argv, dict(os.environ), 3.0, log, res)
    assert status["status"] == "timeout" and status["wall_s"] < 20
    assert rows == [{"x": 1}]
    assert json.loads((tmp_path / "res").read_text()) == {"phase": "slowpoke", "x": 1}
    with open(tmp_path / "log", "w") as log, open(tmp_path / "res", "w") as res:
        status, _ = gpu_proof.run_phase("fails", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                                        30.0, log, res)
    assert status["status"] == "failed (exit 3)"


def test_upstream_checkout_default_and_pass_through(tmp_path, monkeypatch):
    """--nanochat-src, else $NANOCHAT_SRC, else ./.nanochat-src; it reaches decode and its own train phase."""
    monkeypatch.setattr(gpu_proof, "ROOT", tmp_path)
    monkeypatch.delenv("NANOCHAT_SRC", raising=False)
    assert gpu_proof.nanochat_src(None) is None
    (tmp_path / ".nanochat-src").mkdir()
    assert gpu_proof.nanochat_src(None) == str(tmp_path / ".nanochat-src")
    monkeypatch.setenv("NANOCHAT_SRC", str(tmp_path / "env"))
    assert gpu_proof.nanochat_src(None) == str(tmp_path / "env")
    assert gpu_proof.nanochat_src(str(tmp_path / "flag")) == str(tmp_path / "flag")

    for smoke in (True, False):
        got = {name: argv for name, argv, _ in gpu_proof.phases(smoke, tmp_path, "c", True, "/src")}
        assert list(got) == ["env", "tests", "train_jax", "compile_warm", "decode", "train_upstream", "train_torch"]
        assert got["decode"][-2:] == ["--nanochat-src", "/src"]
        assert "--nanochat-src" not in got["train_jax"] + got["compile_warm"] + got["train_torch"]
        up = got["train_upstream"]
        assert up[up.index("--framework") + 1] == "upstream" and up[up.index("--nanochat-src") + 1] == "/src"
        assert ("--torch-eager" in up) == smoke and up[up.index("--depth") + 1] == ("2" if smoke else "20")
    plain = [name for name, _, _ in gpu_proof.phases(False, tmp_path, "c", True)]
    assert "train_upstream" not in plain
    assert ROOT.joinpath(".gitignore").read_text().count("/.nanochat-src/") == 1  # carried, never committed


def test_junit_counts(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite><testcase classname="a" name="ok"/>'
        '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="a" name="skip"><skipped/></testcase>'
        '<testcase classname="b" name="err"><error message="y"/></testcase></testsuite></testsuites>')
    assert gpu_proof.junit_counts(tmp_path / "j.xml") == {
        "passed": 1, "failed": 1, "errors": 1, "skipped": 1, "failing": ["a::bad", "b::err"]}
    assert gpu_proof.junit_counts(tmp_path / "none.xml") == {"junit": "missing"}


def test_out_of_budget_phases_are_skipped_not_started(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.gpu_proof", str(tmp_path), "--cpu-smoke", "--budget-s", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    status = [x for x in read_results(tmp_path) if x.get("kit") == "status"]
    assert status and all(x["status"].startswith("skipped") for x in status)
