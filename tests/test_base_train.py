"""base_train end to end on a tiny model: learning, files, exact resume after SIGKILL, mesh change,
two processes, and clear errors."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import portpicker
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import communicate_all, torch
from xla_flags import cpu_devices_flags

from nanochat_jax.checkpoint import Checkpointer
from nanochat_jax.common import run_cli
from nanochat_jax.report import read_metrics
from nanochat_jax.tokenizer import Tokenizer
from train import base_train

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the king and queen of the land went to see a great ship on the sea where many men sang "
         "songs of old days while the sun rose over hills and rivers ran down to the town").split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three parquet shards of word-salad with bigram structure (last = val) and a 320-token tokenizer."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    nxt = {w: rng.choice(WORDS, 3) for w in WORDS}  # each word has 3 likely successors: learnable
    for s in range(3):
        docs = []
        for _ in range(300):
            w, out = rng.choice(WORDS), []
            for _ in range(rng.integers(20, 120)):
                out.append(w)
                w = rng.choice(nxt[w]) if rng.random() < 0.9 else rng.choice(WORDS)
            docs.append(" ".join(out).capitalize() + ".")
        pq.write_table(pa.table({"text": docs}), d / f"shard_{s:05d}.parquet", row_group_size=64)
    texts = pq.read_table(d / "shard_00000.parquet").column("text").to_pylist()
    Tokenizer.train(texts, 320).save(d / "tok")
    return d


def argv(data, out, *extra):
    return ["--depth", "2", "--head-dim", "64", "--max-seq-len", "64", "--window-pattern", "L",
            "--device-batch-size", "1", "--total-batch-size", "512", "--eval-tokens", "2048", "--core-metric-every", "-1",
            "--sample-every", "0", "--warmup-steps", "2", "--matrix-lr", "0.05", "--embedding-lr", "1.0",
            "--unembedding-lr", "0.02", "--scalar-lr", "1.0",
            "--data-dir", str(data), "--tokenizer-dir", str(data / "tok"), "--out-dir", str(out), *extra]


def losses(out):
    """step -> raw train loss, the last logged value winning (a resumed run re-logs steps)."""
    return {r["step"]: r["train/loss_raw"] for r in read_metrics(out / "metrics.jsonl") if "train/loss_raw" in r}


def final_params(out, step):
    return torch.load(out / "nanochat" / f"model_{step:06d}.pt", weights_only=True)


def test_tiny_run_learns_and_writes_everything(data, tmp_path):
    out = tmp_path / "run"
    base_train.main(argv(data, out, "--num-iterations", "50", "--eval-every", "25"))
    recs = read_metrics(out / "metrics.jsonl")
    train = [r["train/loss"] for r in recs if "train/loss" in r]
    bpb = [r["val/bpb"] for r in recs if "val/bpb" in r]
    assert len(train) == 50 and train[-1] < 0.7 * train[0]
    assert len(bpb) == 3 and bpb[0] > bpb[1] > bpb[2]
    exported = ("nanochat/model_000050.pt", "nanochat/meta_000050.json") if torch is not None else ()
    for name in ("report.md", "loss.png", "val_bpb.png", *exported):
        assert (out / name).is_file(), name
    if torch is None:  # without torch the upstream-format export is skipped, never a crash at the end
        assert not (out / "nanochat").exists()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tb").iterdir())
    assert (out / "checkpoints" / "50" / "commit_success.txt").is_file()


def _run_cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "train.base_train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_resume_after_sigkill_is_bit_exact(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--num-iterations", "20", "--eval-every", "-1", "--mesh", "data=2"]
    env = {**os.environ, "XLA_FLAGS": cpu_devices_flags(2)}
    ra = _run_cli(argv(data, a, *common), env=env)
    rb = _run_cli(argv(data, b, *common, "--save-every", "10"), env=env)
    marker = b / "checkpoints" / "10" / "commit_success.txt"
    deadline = time.time() + 240
    while not marker.exists() and rb.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), rb.communicate()[0][-3000:]
    rb.send_signal(signal.SIGKILL)  # not a clean exit: no atexit, no final save
    rb.wait()
    assert not (b / "nanochat").exists()
    assert ra.wait(timeout=240) == 0, ra.stdout.read()[-3000:]
    rb2 = _run_cli(argv(data, b, *common, "--save-every", "10", "--resume"), env=env)
    log = rb2.communicate(timeout=240)[0]
    assert rb2.returncode == 0, log[-3000:]
    assert "resumed from step 10" in log
    la, lb = losses(a), losses(b)
    assert [lb[s] for s in range(10, 20)] == [la[s] for s in range(10, 20)]  # bit for bit
    if torch is not None:
        pa_, pb_ = final_params(a, 20), final_params(b, 20)
        assert all(torch.equal(pa_[k], pb_[k]) for k in pa_)


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_resume_skips_an_incomplete_checkpoint_and_changes_mesh(data, tmp_path):
    out = tmp_path / "run"
    base_train.main(argv(data, out, "--num-iterations", "6", "--save-every", "3", "--eval-every", "-1",
                         "--mesh", "data=8", "--head-dim", "32"))
    before = losses(out)
    # step 6 looks like a save killed mid-write (no commit marker): it must not be used
    (out / "checkpoints" / "6" / "commit_success.txt").unlink()
    shutil.rmtree(out / "nanochat", ignore_errors=True)  # the .pt export exists only with torch
    base_train.main(argv(data, out, "--num-iterations", "6", "--save-every", "3", "--eval-every", "-1",
                         "--mesh", "data=2,model=4", "--device-batch-size", "4", "--head-dim", "32", "--resume"))
    after = losses(out)
    for s in (3, 4, 5):  # same rows, same math, another layout: equal up to reduction order
        assert after[s] == pytest.approx(before[s], rel=1e-5)
    assert (out / "nanochat" / "model_000006.pt").is_file() == (torch is not None)


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_two_processes_save_one_checkpoint_and_resume(data, tmp_path):
    out = tmp_path / "mp"
    common = ["--num-iterations", "4", "--save-every", "2", "--eval-every", "-1", "--mesh", "data=4"]

    def launch(*extra):
        port = portpicker.pick_unused_port()
        env = {**os.environ, "XLA_FLAGS": cpu_devices_flags(2), "JAX_PLATFORMS": "cpu"}
        procs = [_run_cli(argv(data, out, *common, *extra, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)), env=env) for i in range(2)]
        logs = [out for out, _ in communicate_all(procs, timeout=240)]
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log[-3000:]
        return logs

    launch()
    first = losses(out)
    files = sorted(f.name for f in (out / "checkpoints" / "2" / "data").iterdir() if f.name.startswith("process"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]
    shutil.rmtree(out / "checkpoints" / "4")
    logs = launch("--resume")
    assert "resumed from step 2" in logs[0]
    assert [losses(out)[s] for s in (2, 3)] == [first[s] for s in (2, 3)]


def test_clear_errors(data, tmp_path):
    with pytest.raises(SystemExit, match="--resume but there is no complete checkpoint"):
        base_train.main(argv(data, tmp_path / "empty", "--num-iterations", "2", "--resume"))
    out = tmp_path / "run"
    base_train.main(argv(data, out, "--num-iterations", "2", "--eval-every", "-1"))
    with pytest.raises(SystemExit, match="cannot resume.*n_layer"):
        base_train.main(argv(data, out, "--num-iterations", "2", "--depth", "3", "--resume"))  # last flag wins
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit, match="cannot write the run directory"):
        base_train.main(argv(data, blocker / "run", "--num-iterations", "2"))
    with pytest.raises(SystemExit, match="n_head=2 is not divisible by model=4"):
        base_train.main(argv(data, tmp_path / "r3", "--num-iterations", "2", "--mesh", "data=2,model=4"))
    with pytest.raises(SystemExit, match="not a multiple of one micro-step"):
        base_train.main(argv(data, tmp_path / "r2", "--num-iterations", "2", "--total-batch-size", "500"))


# ---- runs that are never mixed, lost or silently corrupted ---------------------------------------

from test_checkpoint import _biggest_data_file, _flip_byte, tiny_disk  # noqa: E402,F401


def _meta(out, step):
    with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
        return ckpt.read_meta(step)


def test_a_directory_holds_one_run(data, tmp_path):
    out = tmp_path / "run"
    common = ("--num-iterations", "2", "--eval-every", "-1")
    base_train.main(argv(data, out, *common))
    first = losses(out)
    with pytest.raises(SystemExit, match=r"already holds a run \(checkpoints at steps \[2\]\); continue it with "
                                         r"--resume, move it aside with --overwrite, or choose another --out-dir"):
        base_train.main(argv(data, out, *common, "--seed", "1"))
    base_train.main(argv(data, out, *common, "--seed", "1", "--overwrite"))
    (old,) = tmp_path.glob("run.replaced-*")
    assert (old / "checkpoints" / "2" / "commit_success.txt").is_file() and losses(old) == first
    second = read_metrics(out / "metrics.jsonl")
    assert sorted(r["step"] for r in second if "train/loss_raw" in r) == [0, 1]  # only the new run's lines
    assert losses(out) != first and _meta(out, 2)["user_config"]["seed"] == 1


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_resume_falls_back_past_a_corrupt_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--num-iterations", "4", "--save-every", "2", "--eval-every", "-1"]
    base_train.main(argv(data, out, *common))
    before, time2 = losses(out), _meta(out, 2)["loop_state"]["total_training_time"]
    _flip_byte(_biggest_data_file(out / "checkpoints" / "4"))
    capsys.readouterr()
    base_train.main(argv(data, out, *common, "--resume"))
    log = capsys.readouterr().out
    assert re.search(r"warning: checkpoint step 4 in \S+ is corrupt: 1 of \d+ arrays fail their checksum .*; "
                     r"falling back to step 2\n", log), log
    assert "resumed from step 2" in log and len(list((out / "checkpoints").glob("4.corrupt-*"))) == 1
    runs = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss_raw" in r]
    assert runs == [0, 1, 2, 3, 2, 3]  # resumed at 2, not restarted
    assert losses(out) == before  # and bit for bit the same steps
    assert _meta(out, 4)["loop_state"]["total_training_time"] > time2  # carried, and counting again after one step
    base_train.main(argv(data, out, *common, "--resume-step", "2"))  # go back on purpose: step 4 is moved aside
    assert "moved step 4 (after the resumed step 2)" in capsys.readouterr().out
    assert len(list((out / "checkpoints").glob("4.superseded-*"))) == 1 and _meta(out, 4)["step"] == 4


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_sigterm_saves_a_final_checkpoint_that_resumes(data, tmp_path):
    out = tmp_path / "run"
    p = _run_cli(argv(data, out, "--num-iterations", "5000", "--eval-every", "-1"), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("step 00003/"):
            p.send_signal(signal.SIGTERM)
            break
    rest = p.communicate(timeout=120)[0]
    assert p.returncode == 128 + signal.SIGTERM, rest[-3000:]
    assert "Traceback" not in rest
    m = re.search(r"^stopped by SIGTERM at step (\d+); checkpoint step \1 is in (\S+); continue with --resume$",
                  rest, re.M)
    assert m, rest[-3000:]
    step = int(m[1])
    assert 4 <= step < 5000 and (out / "checkpoints" / str(step) / "commit_success.txt").is_file()
    assert re.search(r"tok/sec: [\d,]+ .*\| eta: [\d.]+m$", seen[-1].strip()), seen[-1]  # non-TTY progress
    base_train.main(argv(data, out, "--num-iterations", str(step + 2), "--eval-every", "-1", "--resume"))
    assert sorted(losses(out))[-2:] == [step, step + 1]


def test_disk_full_is_one_line(data, tiny_disk, capsys):  # noqa: F811
    rc = run_cli(base_train.main, argv(data, tiny_disk / "run", "--num-iterations", "2", "--eval-every", "-1"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert rc == 1 and len(err) == 1, err
    assert re.fullmatch(r"error: disk full: checkpoint step 2 needs about [\d.]+ MB but \S+ has [\d.]+ MB free; "
                        r"no earlier checkpoint exists", err[0]), err[0]
