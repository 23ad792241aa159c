"""Every bad input to a training or evaluation CLI: the exit code and the one line that says why, before
any run directory is created or data is downloaded. CASES doubles as the table in docs/training.md."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax.common import run_cli
from test_base_train import argv, data  # noqa: F401  (the tiny shards + tokenizer fixture)
from train import base_eval, base_train, chat_eval, rl, sft, tok_eval, tok_train

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"base_train": base_train.main, "sft": sft.main, "rl": rl.main, "chat_eval": chat_eval.main,
         "base_eval": base_eval.main, "tok_train": tok_train.main, "tok_eval": tok_eval.main}

# (cli, arguments, exit code, regex for the first line of stderr). {data}, {tok}, {tmp}: the fixture's
# shard dir, its tokenizer and a scratch dir; base_train rows get the tiny model's other flags too.
CASES = [
    ("base_train", "--depth 0", 1, r"error: --depth must be >= 1, got 0"),
    ("base_train", "--depth -1", 1, r"error: --depth must be >= 1, got -1"),
    ("base_train", "--max-seq-len 0", 1, r"error: --max-seq-len must be >= 1, got 0"),
    ("base_train", "--window-pattern X", 1, r"error: invalid GPTConfig: window_pattern='X' must be a non-empty string "
                                            r"of 'S' \(short\) and 'L' \(long\)"),
    ("base_train", "--device-batch-size 0", 1, r"error: --device-batch-size must be >= 1, got 0"),
    ("base_train", "--dtype float8", 1, r"error: --dtype 'float8' is not one of \['bfloat16', 'float16', 'float32'\]"),
    ("base_train", "--keep-checkpoints 0", 1, r"error: --keep-checkpoints must be >= 1, got 0"),
    ("base_train", "--keep-checkpoints -1", 1, r"error: --keep-checkpoints must be >= 1, got -1"),
    ("base_train", "--num-iterations 0", 1, r"error: --num-iterations must be >= 1, or -1 for the automatic horizon; "
                                            r"got 0"),
    ("base_train", "--matrix-lr -0.1", 1, r"error: --matrix-lr must be >= 0, got -0.1"),
    ("base_train", "--warmdown-ratio 1.5", 1, r"error: --warmdown-ratio must be in \[0, 1\], got 1.5"),
    ("base_train", "--attention cudnn", 1, r"error: attention backend 'cudnn' needs a CUDA GPU, but JAX is running "
                                           r"on 'cpu'; use 'xla'"),
    ("base_train", "--depth 1000", 1, r"error: --depth 1000 has 49.2T parameters: weights, gradients and "
                                      r"optimizer state need about [\d,.]+ GiB, but the .* have [\d,.]+ GiB"),
    ("base_train", "--data-dir {tmp}/nope", 1, r"error: data directory \S+/nope does not exist; pass --data-dir"),
    ("base_train", "--data-dir {tmp}/empty", 1, r"error: \S+/empty has 0 parquet shard\(s\); training needs at least 2"),
    ("base_train", "--data-dir {tmp}/one", 1, r"error: \S+/one has 1 parquet shard\(s\); training needs at least 2"),
    ("base_train", "--data-dir {tmp}/broken", 1, r"error: parquet shard \S+/broken/shard_00001.parquet is unreadable: "),
    ("base_train", "--tokenizer-dir {tmp}/nope", 1, r"error: no tokenizer at \S+/nope \(expected a directory holding tokenizer.pkl"),
    ("base_train", "--resume", 1, r"error: --resume but there is no complete checkpoint in \S+/run/checkpoints"),
    ("base_train", "--resume --overwrite", 1, r"error: --resume and --overwrite contradict each other"),
    ("sft", "--tokenizer-dir {tok} --base-dir {tmp}/nope", 1, r"error: no checkpoint directory \S+/nope"),
    ("sft", "--num-iterations 0", 1, r"error: --num-iterations must be >= 1, or -1 for one epoch; got 0"),
    ("sft", "--init-lr-frac -1", 1, r"error: --init-lr-frac must be >= 0, got -1.0"),
    ("sft", "--keep-checkpoints 0", 1, r"error: --keep-checkpoints must be >= 1, got 0"),
    ("rl", "--num-samples 0", 1, r"error: --num-samples must be >= 1, got 0"),
    ("rl", "--temperature -1", 1, r"error: --temperature must be >= 0, got -1.0"),
    ("rl", "--tokenizer-dir {tok} --sft-dir {tmp}/nope --task-data-dir {tmp}/offline", 1,
     r"error: no checkpoint directory \S+/nope"),
    ("chat_eval", "--tokenizer-dir {tok} --checkpoint {tmp}/nope", 1, r"error: checkpoint directory \S+/nope does not "
                                                                      r"exist"),
    ("chat_eval", "--tokenizer-dir {tok} -n 0", 1, r"error: --num-samples must be >= 1, got 0"),
    ("chat_eval", "--tokenizer-dir {tok} -a Chess", 1, r"error: unknown task 'Chess'; choose from ARC-Easy\|"),
    ("chat_eval", "--tokenizer-dir {tok} --out {tmp}/no/such/dir/r.json", 1, r"error: cannot write --out \S+r.json: "),
    ("chat_eval", "--tokenizer-dir {tmp}/nope", 1, r"error: no tokenizer at \S+/nope \(expected a directory holding tokenizer.pkl"),
    ("base_eval", "--checkpoint {tmp}/nope --tokenizer-dir {tok}", 1, r"error: checkpoint directory \S+/nope does not "
                                                                      r"exist"),
    ("base_eval", "--checkpoint {tmp}/empty --eval bpb --max-per-task 0", 1, r"error: --max-per-task must be >= 1, "
                                                                             r"or -1 for all; got 0"),
    ("base_eval", "--checkpoint {tmp}/empty --eval bpb", 1, r"error: cannot load the checkpoint: no complete "
                                                            r"checkpoint in \S+/empty"),
    ("tok_train", "--vocab-size 100", 1, r"tok_train: --vocab-size must be >= 266 "),
    ("tok_train", "--data-dir {tmp}/empty", 1, r"tok_train: need at least 2 parquet shards in \S+/empty"),
    ("tok_eval", "--tokenizer-dir {tmp}/nope", 1, r"tok_eval: no tokenizer at \S+/nope \(expected a directory holding tokenizer.pkl"),
]


@pytest.fixture(scope="module")
def scratch(data, tmp_path_factory):  # noqa: F811
    """Bad data dirs next to the good fixture: empty, one shard, one truncated shard."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    (d / "one").mkdir()
    pq.write_table(pa.table({"text": ["a b c"]}), d / "one" / "shard_00000.parquet")
    (d / "broken").mkdir()
    pq.write_table(pa.table({"text": ["a b c"]}), d / "broken" / "shard_00000.parquet")
    good = (data / "shard_00001.parquet").read_bytes()
    (d / "broken" / "shard_00001.parquet").write_bytes(good[: len(good) // 2])  # a download cut short
    (d / "offline").mkdir()
    return d


def invoke(main, args, capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) as `python -m train.<cli> args` would give them."""
    try:
        code = run_cli(main, args)
    except SystemExit as e:  # Python prints a string code to stderr and exits 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = 1 if isinstance(e.code, str) else e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()
           and "Warning" not in line and not line.startswith(("WARNING", "  warnings.warn"))]
    return code, err


def expand(cli, args, data, scratch):  # noqa: F811
    parts = args.format(data=data, tok=data / "tok", tmp=scratch).split()
    if cli == "base_train":
        defaults = argv(data, scratch / "run", "--num-iterations", "2")
        return defaults + parts  # the last occurrence of a flag wins
    return parts


@pytest.mark.parametrize("cli,args,code,first", CASES, ids=[f"{c}:{a.split()[0]}:{a.split()[-1][-12:]}" for c, a, *_ in CASES])
def test_bad_input_is_one_line(cli, args, code, first, data, scratch, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(scratch / "home"))
    got, err = invoke(MAINS[cli], expand(cli, args, data, scratch), capsys)
    assert got == code and len(err) == 1 and "Traceback" not in err[0], err
    assert __import__("re").match(first, err[0]), err[0]
    assert not (scratch / "run").exists(), "a failed run left its directory behind"
    assert not (scratch / "nope").exists(), "a reader created the directory it was asked to read"
    assert not (scratch / "home" / "chatrl_checkpoints").exists()


def test_unexpected_errors_are_one_line_unless_debug(capsys):
    def main(argv):
        raise RuntimeError("something broke\nsecond line")

    assert run_cli(main, []) == 1
    assert capsys.readouterr().err == "error: RuntimeError: something broke (rerun with --debug for the traceback)\n"
    with pytest.raises(RuntimeError):
        run_cli(main, ["--debug"])
    assert run_cli(lambda argv: (_ for _ in ()).throw(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_the_real_command_line_prints_one_line(data, tmp_path):  # noqa: F811
    r = subprocess.run([sys.executable, "-m", "train.base_train", *argv(data, tmp_path / "run", "--depth", "0")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "error: --depth must be >= 1, got 0", r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_a_stop_signal_is_a_flag_not_a_traceback(capfd):
    """The first SIGINT/SIGTERM in the training loop only asks it to stop (it then saves and exits);
    the previous handlers come back afterwards."""
    import signal

    from nanochat_jax.common import StopSignals

    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        assert stop.requested() and stop.name == "SIGINT" and stop.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before
    assert "SIGINT: stopping after this step with a final checkpoint" in capfd.readouterr().err
