"""The GPU proof kit: every GPU check and figure we owe, in one command that fits a short lease.

    bash bench/gpu_proof.sh OUT_DIR               # on the GPU host (wheels from .whl/, no network)
    bash bench/gpu_proof.sh OUT_DIR --cpu-smoke   # the same phases at tiny sizes on CPU
    bash bench/gpu_proof.sh OUT_DIR --nanochat-src DIR   # upstream nanochat beside ours (default below)

Phases, each a subprocess with its own time cap inside one overall budget (default 460 s), in
order of what a lease must not miss:

  env          versions, devices, nvidia-smi
  tests        the `gpu`-marked tests (cuDNN vs XLA attention, bf16 and fp32 parity with the torch
               reference on the device, engine greedy = naive, a sharded training step)
  train_jax    bench.train, ours: d12 and d20, T=2048, B=32, bf16 — tok/s, MFU, cold compile
               (empty persistent cache), peak device memory
  compile_warm bench.train d20 again in a fresh process on the now-filled cache: warm compile
  decode       bench.decode d20: batch-1 tok/s, 8 samples of one prompt, 64 streams through the
               scheduler, TTFT; with a checkout, upstream's Engine (batch 1 and 8 samples) after ours
  train_upstream  with a checkout: upstream's own compiled training step, d20, same sizes
  train_torch  bench.train, the torch reference under torch.compile, same sizes, same GPU

Upstream nanochat comes from --nanochat-src DIR, else $NANOCHAT_SRC, else .nanochat-src/ in the
repository root (a checkout copied there and carried to the GPU host as an ignored path), else
it is left out. Its training step has a phase of its own with its own cap, after every phase of
ours: torch.compile of d20 at T=2048 may take minutes, and a slow compile then costs only its own
row (and the torch reference's time after it), never ours. Its decode rows run inside the decode
phase, after ours are printed (and kept, whatever happens next): eager torch, no compile.

Writes OUT_DIR/results.jsonl (every JSON line a phase printed, tagged with the phase, plus one
status line per phase), OUT_DIR/log.txt (all output) and OUT_DIR/gpu_tests.xml, and prints a
short table last. A phase that fails or runs out of time is recorded as such and the kit goes on.
In --cpu-smoke the tests run on CPU (NANOCHAT_GPU_TESTS_ON_CPU=1; the cuDNN one skips) and the
benchmarks at depth 2, so the whole kit is proven before any GPU is at hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GPU_SIZES = dict(
    train=["--depth", "12", "20", "--seq-len", "2048", "--batch-size", "32", "--dtype", "bfloat16",
           "--warmup", "1", "--iters", "3"],
    warm=["--depth", "20", "--seq-len", "2048", "--batch-size", "32", "--dtype", "bfloat16", "--warmup", "0",
          "--iters", "1"],
    decode=["--depth", "20", "--seq-len", "2048", "--dtype", "bfloat16", "--prompt-tokens", "32",
            "--new-tokens", "128", "--streams", "64", "--steps-per-call", "1", "8", "--repeats", "2",
            "--torch-batch", "1", "8", "--torch-threads", "1"],
    upstream=["--depth", "20", "--seq-len", "2048", "--batch-size", "32", "--dtype", "bfloat16",
              "--warmup", "1", "--iters", "3"],
)
SMOKE_SIZES = dict(
    train=["--depth", "2", "--seq-len", "64", "--batch-size", "2", "--vocab-size", "512", "--warmup", "0",
           "--iters", "1"],
    warm=["--depth", "2", "--seq-len", "64", "--batch-size", "2", "--vocab-size", "512", "--warmup", "0",
          "--iters", "1"],
    decode=["--depth", "2", "--seq-len", "64", "--vocab-size", "512", "--prompt-tokens", "8", "--new-tokens", "8",
            "--streams", "4", "--steps-per-call", "1", "--repeats", "1", "--torch-batch", "1", "2",
            "--torch-threads", "1"],
    upstream=["--depth", "2", "--seq-len", "64", "--batch-size", "2", "--vocab-size", "512", "--warmup", "0",
              "--iters", "1", "--torch-eager"],  # torch.compile's C++ build alone outlasts a CPU smoke
)
# (name, share of the budget it may use at most, seconds it needs to be worth starting)
CAPS = {"env": (0.1, 5), "tests": (0.3, 30), "train_jax": (0.35, 40), "compile_warm": (0.15, 20),
        "decode": (0.3, 30), "train_upstream": (0.3, 40), "train_torch": (0.45, 40)}

ENV_PROBE = r"""
import json, platform, subprocess, sys
row = {"python": platform.python_version()}
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "torch", "fastapi"):
    try:
        mod = __import__(name, fromlist=["_"])
        row[name] = getattr(mod, "__version__", "?")
    except Exception as e:  # a missing package is a finding, not a crash
        row[name] = f"missing ({type(e).__name__})"
import jax
row["backend"] = jax.default_backend()
row["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
try:
    row["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm",
                                        "--format=csv,noheader"], capture_output=True, text=True,
                                       timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    row["nvidia_smi"] = None
print(json.dumps(row))
"""


def nanochat_src(arg):
    """The upstream checkout to run beside ours: the flag, $NANOCHAT_SRC, ./.nanochat-src, or None."""
    for src in (arg, os.environ.get("NANOCHAT_SRC")):
        if src:
            return str(Path(src).resolve())
    return str(ROOT / ".nanochat-src") if (ROOT / ".nanochat-src").is_dir() else None


def phases(smoke: bool, out: Path, cache: str, has_torch: bool, src=None):
    """(name, argv, extra env) in the order they run; src: an upstream checkout, or None."""
    py = sys.executable
    sizes = SMOKE_SIZES if smoke else GPU_SIZES
    test_env = {"NANOCHAT_GPU_TESTS_ON_CPU": "1"} if smoke else {}
    yield "env", [py, "-c", ENV_PROBE], {}
    yield "tests", [py, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "tests/test_attention.py", "-q", "-rA",
                    "-p", "no:cacheprovider", f"--junitxml={out / 'gpu_tests.xml'}"], test_env
    yield "train_jax", [py, "-m", "bench.train", "--framework", "jax", "--compile-cache", cache, *sizes["train"]], {}
    yield "compile_warm", [py, "-m", "bench.train", "--framework", "jax", "--compile-cache", cache,
                           *sizes["warm"]], {}
    up = ["--nanochat-src", src] if src and has_torch else []  # upstream runs on torch
    yield "decode", [py, "-m", "bench.decode", *sizes["decode"], *([] if has_torch else ["--no-torch"]), *up], {}
    if up:
        yield "train_upstream", [py, "-m", "bench.train", "--framework", "upstream", *up, *sizes["upstream"]], {}
    if has_torch:
        eager = ["--torch-eager"] if smoke else []  # torch.compile's C++ build alone outlasts a CPU smoke
        yield "train_torch", [py, "-m", "bench.train", "--framework", "torch", *eager, *sizes["train"]], {}


def junit_counts(path: Path) -> dict:
    """passed/failed/errors/skipped and the failing test names from a pytest junit file."""
    if not path.is_file():
        return {"junit": "missing"}
    root = ET.parse(path).getroot()
    counts, failing = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}, []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failing.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failing.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failing": failing}


def run_phase(name, argv, env, timeout, log, results):
    """Run one phase, teeing its output to the log; JSON-object lines go to results. Output is read
    in chunks, not lines, so a phase that prints no newline (pytest's dots) still meets its cap."""
    t0 = time.perf_counter()
    log.write(f"\n===== {name}: {' '.join(argv)} (cap {timeout:.0f} s)\n")
    log.flush()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    rows, pending, timed_out = [], b"", False

    def take(line: bytes):
        s = line.decode(errors="replace").strip()
        if not (s.startswith("{") and s.endswith("}")):
            return
        try:
            row = json.loads(s)
        except json.JSONDecodeError:
            return
        if isinstance(row, dict):
            rows.append(row)
            results.write(json.dumps({"phase": name, **row}) + "\n")
            results.flush()

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        deadline = t0 + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                timed_out = True
                break
            if not sel.select(timeout=min(left, 1.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:  # EOF: the phase closed its output (it exited)
                break
            log.write(chunk.decode(errors="replace"))
            log.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                take(line)
        take(pending)
    finally:
        sel.close()
        if proc.poll() is None and not timed_out:  # closed its output: give it a moment to exit
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        proc.stdout.close()
    wall = time.perf_counter() - t0
    status = "timeout" if timed_out else ("ok" if rc == 0 else f"failed (exit {rc})")
    return {"phase": name, "status": status, "wall_s": round(wall, 1)}, rows


def summary_lines(rows_by_phase, statuses):
    """A short human table of the figures that matter."""
    out = [f"{'phase':<14} {'status':<16} {'wall s':>7}"]
    out += [f"{s['phase']:<14} {s['status']:<16} {s['wall_s']:>7}" for s in statuses]
    for phase in ("train_jax", "train_upstream", "train_torch", "compile_warm"):
        for r in rows_by_phase.get(phase, []):
            if "step_s" in r:
                mem = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else "-"
                mfu = f"{r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
                out.append(f"{phase:<14} d{r['depth']:<3} {r['framework']:<18} {r['tok_per_s']:>10.0f} tok/s "
                           f"MFU {mfu:>6} compile {r['compile_s']:6.1f} s peak {mem}")
    for r in rows_by_phase.get("decode", []):
        if "impl" in r:
            out.append(f"decode         {r['impl']:<18} batch {r['batch']:<3} {r['tok_per_s']:>9.1f} tok/s "
                       f"TTFT {r['ttft_s'] * 1e3:7.1f} ms")
        elif "summary" in r:
            ratios = {k: round(v, 2) for b in ("batch1", "batch8") for k, v in r[b].items() if "_over_" in k and v}
            out.append(f"decode         ours over the others: {ratios}")
    t = rows_by_phase.get("tests_counts")
    if t:
        out.append(f"tests          {t}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: proves the kit without a GPU")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_PROOF_BUDGET_S", 460)))
    ap.add_argument("--only", nargs="+", choices=list(CAPS), help="run only these phases")
    ap.add_argument("--nanochat-src", metavar="DIR",
                    help="upstream nanochat checkout (default: $NANOCHAT_SRC, else .nanochat-src/ if present)")
    args = ap.parse_args(argv)

    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    has_torch = importlib.util.find_spec("torch") is not None
    src = nanochat_src(args.nanochat_src) if has_torch else None  # upstream runs on torch
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if args.cpu_smoke:  # one CPU device, like the host's one GPU: a fake-device count goes, other XLA flags stay
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                    if not f.startswith("--xla_force_host_platform_device_count"))
    deadline = time.perf_counter() + args.budget_s
    statuses, rows_by_phase = [], {}
    with tempfile.TemporaryDirectory(prefix="nanochat-jax-cache-") as cache, \
            open(out / "log.txt", "w") as log, open(out / "results.jsonl", "w") as results:
        for name, cmd, extra in phases(args.cpu_smoke, out, cache, has_torch, src):
            if args.only and name not in args.only:
                continue
            share, need = CAPS[name]
            left = deadline - time.perf_counter()
            if left < need:
                status = {"phase": name, "status": f"skipped ({left:.0f} s left of the budget)", "wall_s": 0.0}
            else:
                cap = max(need, min(left, share * args.budget_s if name != "train_torch" else left))
                status, rows = run_phase(name, cmd, {**env, **extra}, cap, log, results)
                rows_by_phase[name] = rows
                if name == "tests":
                    status.update(junit_counts(out / "gpu_tests.xml"))
                    rows_by_phase["tests_counts"] = {k: status[k] for k in ("passed", "failed", "errors", "skipped")
                                                     if k in status}
            statuses.append(status)
            results.write(json.dumps({"kit": "status", "smoke": args.cpu_smoke, "nanochat_src": src, **status}) + "\n")
            results.flush()
            print(json.dumps(status), flush=True)
    table = summary_lines(rows_by_phase, statuses)
    (out / "summary.txt").write_text("\n".join(table) + "\n")
    print("\n".join(table), flush=True)
    bad = [s["phase"] for s in statuses if s["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
