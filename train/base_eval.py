"""Evaluate a base model: CORE, bits per byte on train/val, and samples.

    python -m train.base_eval --checkpoint RUN/checkpoints --tokenizer-dir T          # our Orbax run
    python -m train.base_eval --nanochat ~/.cache/nanochat/base_checkpoints/d20 ...   # upstream model_*.pt
    python -m train.base_eval --download                 # fetch eval_bundle.zip first (once)
    python -m train.base_eval --eval core --max-per-task 50 ...

CORE writes <out-dir>/base_model_{step:06d}.csv (a row per task with accuracy and centered
accuracy, then the CORE row), like nanochat. The params are replicated over this host's
devices and each batch is split over them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanochat_jax import paths, sharding
from nanochat_jax.common import DTYPES, resolve_dtype, run_cli, tune_malloc
from nanochat_jax.download import DownloadError
from nanochat_jax.evals import core as core_eval, core_tasks
from nanochat_jax.paths import home_dir, pretrain_data_dir, tokenizer_dir

EVALS = ("core", "bpb", "sample")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--eval", default="core,bpb,sample", help="comma-separated subset of core,bpb,sample")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="our Orbax checkpoint directory (RUN/checkpoints)")
    src.add_argument("--nanochat", default=None, help="a nanochat model_*.pt directory (or its d<N> parent)")
    a("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    a("--tokenizer-dir", default=None, help="default $NANOCHAT_JAX_HOME/tokenizer")
    a("--bundle-dir", default=None, help="CORE eval bundle (default $NANOCHAT_JAX_HOME/eval_bundle)")
    a("--download", action="store_true", help="download the eval bundle into --bundle-dir if it is not there")
    a("--bundle-url", default=core_tasks.EVAL_BUNDLE_URL)
    a("--tasks", default=None, help="comma-separated CORE task labels (default: all in the bundle)")
    a("--max-per-task", type=int, default=-1, help="examples per CORE task (-1: all)")
    a("--device-batch-size", type=int, default=32, help="rows per device per forward (bpb; CORE's token budget)")
    a("--split-tokens", type=int, default=40 * 524288, help="tokens per split for bpb")
    a("--data-dir", default=None, help="parquet shards for bpb (default as base_train)")
    a("--out-dir", default=None, help="where the CORE csv goes (default $NANOCHAT_JAX_HOME/base_eval)")
    a("--dtype", default=None, help="float32 | bfloat16 (default: by platform)")
    a("--attention", default="auto", help="auto | xla | cudnn | splash")
    a("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return ap.parse_args(argv)


def check_args(args, evals) -> None:
    """Ranges and the checkpoint's existence, before any download or model load (one-line SystemExit)."""
    for name in ("device_batch_size", "split_tokens"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_per_task != -1 and args.max_per_task < 1:
        _fail(f"--max-per-task must be >= 1, or -1 for all; got {args.max_per_task}")
    if args.step is not None and args.step < 0:
        _fail(f"--step must be >= 0, got {args.step}")
    if args.dtype is not None and args.dtype not in DTYPES:
        _fail(f"--dtype {args.dtype!r} is not one of {sorted(DTYPES)}")
    src = args.checkpoint or args.nanochat
    if src is not None and not Path(src).is_dir():
        _fail(f"checkpoint directory {src} does not exist")
    if args.checkpoint is not None:
        from nanochat_jax.checkpoint import Checkpointer, CheckpointError, checkpoint_dir

        try:
            with Checkpointer(checkpoint_dir(args.checkpoint), read_only=True) as ckpt:
                ckpt.read_meta(args.step)
        except CheckpointError as e:
            _fail(f"cannot load the checkpoint: {e}")
    if "core" in evals and src is not None:  # the CSV comes at the end: an unwritable place fails now
        out_dir = Path(args.out_dir) if args.out_dir else home_dir() / "base_eval"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out_dir):
                pass
        except OSError as e:
            _fail(f"cannot write --out-dir {out_dir}: {e.strerror or e}")


def _fail(msg: str):
    raise SystemExit(f"error: {msg}")


def load_model(args, dtype):
    from nanochat_jax.checkpoint import load_params
    from nanochat_jax.convert import load_nanochat_checkpoint

    try:
        if args.nanochat is not None:
            params, config, meta = load_nanochat_checkpoint(args.nanochat, step=args.step, dtype=dtype)
            step = meta.get("step", args.step)
        else:
            ckpt = Path(args.checkpoint)
            if not ckpt.is_dir():
                _fail(f"checkpoint directory {ckpt} does not exist")
            params, config, meta = load_params(ckpt, step=args.step)  # a run dir works too
            step = meta.get("step", args.step)
    except (FileNotFoundError, ValueError, KeyError) as e:
        _fail(f"cannot load the checkpoint: {e}")
    return params, config, int(step or 0)


def main(argv=None) -> int:
    args = parse_args(argv)
    tune_malloc()  # before the backend starts: reuse freed host memory (common.tune_malloc)
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = sorted(set(evals) - set(EVALS))
    if unknown:
        _fail(f"unknown --eval {unknown}; choose from {list(EVALS)}")
    check_args(args, evals)
    dtype = resolve_dtype(args.dtype)
    jax.config.update("jax_compilation_cache_dir", str(home_dir() / "jax_cache"))  # persistent compile cache

    # Resolve every input before the slow parts, so a missing file fails in a second.
    bundle = None
    if "core" in evals or args.download:
        bundle_dir = Path(args.bundle_dir) if args.bundle_dir else paths.bundle_dir()
        if args.download:
            try:
                core_tasks.download_bundle(bundle_dir, args.bundle_url)
            except DownloadError as e:
                _fail(str(e))
            print(f"eval bundle ready in {bundle_dir}")
        if "core" in evals:
            try:
                bundle = core_tasks.load_bundle(bundle_dir)
                if args.tasks:
                    bundle = bundle.select([t.strip() for t in args.tasks.split(",") if t.strip()])
            except (FileNotFoundError, core_tasks.CoreDataError) as e:
                _fail(str(e))
            if not bundle.tasks:
                _fail(f"no CORE task files under {bundle_dir / core_tasks.DATA_DIRNAME}")
    if args.checkpoint is None and args.nanochat is None:
        if args.download:
            return 0  # --download alone just fetches the bundle
        _fail("one of --checkpoint (our Orbax run) or --nanochat (model_*.pt directory) is required")
    if not evals:
        return 0

    from nanochat_jax.tokenizer import Tokenizer

    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else tokenizer_dir()
    try:
        tok = Tokenizer.load(tok_dir)
    except (FileNotFoundError, ValueError) as e:
        _fail(f"cannot load the tokenizer: {e}")
    data_dir = None
    if "bpb" in evals:
        data_dir = Path(args.data_dir) if args.data_dir else pretrain_data_dir()
        if len(list(data_dir.glob("*.parquet"))) < 2:
            _fail(f"bpb needs at least 2 parquet shards (train + val) in {data_dir}; pass --data-dir")
    params, config, step = load_model(args, dtype)
    if tok.vocab_size > config.vocab_size:
        _fail(f"the tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}")

    mesh = sharding.make_mesh("data=-1", devices=jax.local_devices())
    n_dev = mesh.shape["data"]
    params = jax.device_put(params, NamedSharding(mesh, P()))
    print(f"model: step {step}, {config}; {n_dev} {jax.devices()[0].device_kind} device(s), compute {dtype.name}")
    out_dir = Path(args.out_dir) if args.out_dir else home_dir() / "base_eval"
    results = {}

    if "core" in evals:
        t0 = time.time()
        scorer = core_eval.model_scorer(params, config, dtype=dtype, backend=args.attention, mesh=mesh)
        out = core_eval.evaluate_core(scorer, tok, bundle, max_per_task=args.max_per_task,
                                      batch_tokens=args.device_batch_size * n_dev * config.sequence_len,
                                      progress=sys.stderr.isatty())
        path = core_eval.write_results_csv(out_dir / f"base_model_{step:06d}.csv", out)
        results["core"] = out["core_metric"]
        print(f"CORE metric: {out['core_metric']:.4f} over {out['num_tasks']}/{out['total_tasks']} tasks "
              f"({time.time() - t0:.1f}s); wrote {path}")

    if "bpb" in evals:
        from nanochat_jax.data.pipeline import pretrain_loader
        from nanochat_jax.evals.bpb import evaluate_bpb

        rows, T = args.device_batch_size * n_dev, config.sequence_len
        steps = max(1, args.split_tokens // (rows * T))
        encode = lambda texts: tok.encode(texts, prepend=tok.bos_token_id)  # noqa: E731
        for split in ("train", "val"):
            it = iter(pretrain_loader(data_dir, encode, tok.bos_token_id, rows, T, split=split, prefetch=0))
            batches = list(itertools.islice(it, steps))
            if hasattr(it, "close"):
                it.close()
            if not batches:
                _fail(f"the {split} split in {data_dir} gives no full {rows}x{T} batch")
            bpb = evaluate_bpb(params, batches, config, tok.token_bytes, dtype=dtype, backend=args.attention,
                               mesh=mesh)
            results[f"{split}_bpb"] = bpb
            print(f"{split} bpb: {bpb:.6f} ({len(batches)} batches of {rows}x{T} tokens)")

    if "sample" in evals:
        from nanochat_jax.scheduler import Engine
        from train.base_train import sample

        one = jax.device_put(params, jax.local_devices()[0])
        print("greedy completions:")
        for line in sample(one, config, tok, dtype, args.attention):
            print("  " + line.replace("\n", " "))
        rows, _ = Engine(one, config, tok, dtype=dtype).generate_batch([tok.bos_token_id], num_samples=8,
                                                                       max_tokens=128, temperature=1.0)
        print("unconditional samples:")
        for r in rows:
            print("  " + tok.decode(r[1:]).replace("\n", " "))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
