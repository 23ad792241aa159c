"""Pretraining: one --depth dial → model, horizon, batch size, LRs; then train.

    python -m train.base_train --depth 20                      # nanochat's defaults
    python -m train.base_train --depth 4 --max-seq-len 256 --device-batch-size 8 \
        --num-iterations 200 --data-dir D --tokenizer-dir T   # tiny CPU run

Loop as upstream: every pass evaluates val bpb / samples / saves on its cadence, then takes
one optimizer step of grad_accum micro-batches (one jit). Checkpoints (params, optimizer
state, data-iterator state, loop state) are async Orbax saves; --resume continues from the
latest intact one (a corrupt latest step is reported and skipped; --resume-step picks one) with the
same data and loss trajectory, on any mesh. Every argument, path and shard is checked before the run
directory is created; a directory that already holds a run is refused unless --resume or --overwrite.
SIGINT/SIGTERM stop at the next step with a final checkpoint. See docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
from pathlib import Path

import jax
from tqdm import tqdm

from nanochat_jax import attention, flops, model, optim, scaling, sharding
from nanochat_jax.checkpoint import RunDirError, prepare_run_dir
from nanochat_jax.common import (DTYPES, StopSignals, check_model_fits, mfu, need, peak_flops, resolve_dtype, run_cli)
from nanochat_jax.config import Dial
from nanochat_jax.convert import export_nanochat_checkpoint, torch_available
from nanochat_jax.data.dataset import check_parquet
from nanochat_jax.data.pipeline import pretrain_loader, val_batches
from nanochat_jax.evals import core as core_eval, core_tasks
from nanochat_jax.evals.bpb import evaluate_bpb
from nanochat_jax.loop import next_batch, open_checkpointer, removed_on_failure, resume, run, start_run
from nanochat_jax.paths import home_dir, pretrain_data_dir, tokenizer_dir
from nanochat_jax.report import RunLogger, format_step_line, write_report
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train_step import abstract_train_state, init_train_state, make_train_step

SAMPLE_PROMPTS = ("The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is")
TIMING_SKIP_STEPS = 10  # total_training_time excludes the first steps (compile, warm-up), as upstream


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--depth", type=int, default=20, help="the dial: width, heads, horizon, batch and LRs derive from it")
    a("--aspect-ratio", type=int, default=64)
    a("--head-dim", type=int, default=128)
    a("--max-seq-len", type=int, default=2048)
    a("--window-pattern", default="SSSL")
    a("--num-iterations", type=int, default=-1, help="explicit horizon (-1: from --target-flops, else the ratio)")
    a("--target-flops", type=float, default=-1, help="-1: unused")
    a("--target-param-data-ratio", type=float, default=12, help="tokens per parameter, when neither is given")
    a("--device-batch-size", type=int, default=32, help="rows per batch-sharded device per micro-step")
    a("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1: from the depth)")
    a("--embedding-lr", type=float, default=0.3)
    a("--unembedding-lr", type=float, default=0.008)
    a("--matrix-lr", type=float, default=0.02)
    a("--scalar-lr", type=float, default=0.5)
    a("--weight-decay", type=float, default=0.28)
    a("--warmup-steps", type=int, default=40)
    a("--warmdown-ratio", type=float, default=0.65)
    a("--final-lr-frac", type=float, default=0.05)
    a("--optimizer", default="nanochat", choices=optim.OPTIMIZERS)
    a("--resume", action="store_true", help="continue from the latest intact checkpoint in --out-dir")
    a("--resume-step", type=int, default=None, help="continue from this step (implies --resume; newer steps "
                                                     "are moved aside)")
    a("--overwrite", action="store_true", help="move a run already in --out-dir aside to <out-dir>.replaced-<time>")
    a("--debug", action="store_true", help="tracebacks instead of one-line errors")
    a("--eval-every", type=int, default=250, help="val bpb cadence in steps (<= 0: off)")
    a("--eval-tokens", type=int, default=80 * 524288)
    a("--core-metric-every", type=int, default=2000, help="CORE every N steps and at the end (-1: off)")
    a("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1: all)")
    a("--bundle-dir", default=None, help="CORE eval bundle (default $NANOCHAT_JAX_HOME/eval_bundle; "
                                         "get it with python -m train.base_eval --download)")
    a("--sample-every", type=int, default=2000, help="<= 0: off")
    a("--save-every", type=int, default=-1, help="checkpoint cadence in steps (<= 0: only at the end)")
    a("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (>= 1; the final one always is)")
    a("--model-tag", default=None, help="run name (default d<depth>)")
    a("--mesh", default="data=-1", help="e.g. data=-1,fsdp=2,model=2")
    a("--dtype", default=None, help="float32 | bfloat16 (default: by platform)")
    a("--attention", default="auto", help="auto | xla | cudnn | splash")
    a("--data-dir", default=None, help="parquet shards (default: ClimbMix dir, else the offline corpus)")
    a("--tokenizer-dir", default=None)
    a("--out-dir", default=None, help="run directory (default $NANOCHAT_JAX_HOME/base_checkpoints/<tag>)")
    a("--seed", type=int, default=0)
    a("--coordinator", default=None)
    a("--num-processes", type=int, default=None)
    a("--process-id", type=int, default=None)
    args = ap.parse_args(argv)
    if args.resume_step is not None:
        args.resume = True
    return args


def check_args(args) -> None:
    """Every range that does not need the devices or files, before anything is created (ValueError)."""
    for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "keep_checkpoints"):
        need(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    need(args.num_iterations == -1 or args.num_iterations >= 1,
         f"--num-iterations must be >= 1, or -1 for the automatic horizon; got {args.num_iterations}")
    need(args.target_flops == -1 or args.target_flops > 0, f"--target-flops must be > 0 or -1, got {args.target_flops}")
    need(args.num_iterations > 0 or args.target_flops > 0 or args.target_param_data_ratio > 0,
         f"--target-param-data-ratio must be > 0 when it sets the horizon, got {args.target_param_data_ratio}")
    need(args.total_batch_size == -1 or args.total_batch_size >= 1,
         f"--total-batch-size must be >= 1, or -1 to derive it from the depth; got {args.total_batch_size}")
    for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay", "warmup_steps"):
        need(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("warmdown_ratio", "final_lr_frac"):
        need(0 <= getattr(args, name) <= 1, f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    need(args.eval_every <= 0 or args.eval_tokens >= 1, f"--eval-tokens must be >= 1, got {args.eval_tokens}")
    need(args.dtype is None or args.dtype in DTYPES, f"--dtype {args.dtype!r} is not one of {sorted(DTYPES)}")
    need(args.resume_step is None or args.resume_step >= 0, f"--resume-step must be >= 0, got {args.resume_step}")
    need(not (args.resume and args.overwrite), "--resume and --overwrite contradict each other: pick one")


def check_data_dir(data_dir: Path) -> None:
    """At least two readable parquet shards with a text column (the last is val), checked by their footers."""
    if not data_dir.is_dir():
        raise ValueError(f"data directory {data_dir} does not exist; pass --data-dir (or download shards with "
                         "python -m nanochat_jax.data.dataset)")
    shards = sorted(data_dir.glob("*.parquet"))
    if len(shards) < 2:
        raise ValueError(f"{data_dir} has {len(shards)} parquet shard(s); training needs at least 2 (the last one "
                         "is the validation split)")
    for shard in shards:
        try:
            check_parquet(shard)
        except Exception as e:  # pyarrow raises several types for a broken footer
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"parquet shard {shard} is unreadable: {why}") from None


@dataclasses.dataclass
class Plan:
    """Every number the dial derives, printed at start and stored in the checkpoint meta."""
    total_batch_size: int
    num_iterations: int
    rows_per_micro: int
    grad_accum: int
    flops_per_token: int
    batch_lr_scale: float
    muon_weight_decay: float


def make_plan(args, dial, mesh) -> Plan:
    config = dial.config
    B = args.total_batch_size if args.total_batch_size > 0 else scaling.auto_total_batch_size(
        dial, args.target_param_data_ratio)
    N = scaling.num_iterations(config, B, num_iterations=args.num_iterations, target_flops=args.target_flops,
                               param_data_ratio=args.target_param_data_ratio)
    if N < 1:
        raise ValueError(f"the training horizon comes out at {N} steps (from --target-flops / "
                         "--target-param-data-ratio); raise it or pass --num-iterations")
    rows = args.device_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]
    tokens_per_micro = rows * config.sequence_len
    if B % tokens_per_micro:
        raise SystemExit(f"error: total batch {B} tokens is not a multiple of one micro-step "
                         f"({args.device_batch_size} rows x {mesh.shape['data'] * mesh.shape['fsdp']} batch-sharded devices "
                         f"x {config.sequence_len} tokens = {tokens_per_micro}); change --total-batch-size, "
                         "--device-batch-size or --max-seq-len")
    return Plan(B, N, rows, B // tokens_per_micro, flops.estimate_flops(config), scaling.batch_lr_scale(B),
                scaling.scaled_weight_decay(dial, B, args.weight_decay, args.target_param_data_ratio))


def sample(params, config, tok, dtype, backend, max_tokens=16) -> list[str]:
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = tok.encode(prompt, prepend=tok.bos_token_id)
        new = list(model.generate(params, ids, config, max_tokens, temperature=0.0, dtype=dtype, backend=backend))
        out.append(prompt + tok.decode(new))
    return out


def main(argv=None):
    args = parse_args(argv)
    main_proc = start_run(args, check_args, args.coordinator, args.num_processes, args.process_id)

    tag = args.model_tag or f"d{args.depth}"
    out_dir = Path(args.out_dir) if args.out_dir else home_dir() / "base_checkpoints" / tag
    data_dir = Path(args.data_dir) if args.data_dir else pretrain_data_dir()
    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else tokenizer_dir()
    # Every input is checked before the run directory exists, so a mistake costs seconds and leaves nothing.
    try:
        tok = Tokenizer.load(tok_dir)
        check_data_dir(data_dir)
        dtype = resolve_dtype(args.dtype)
        if args.attention != "auto":
            attention.resolve_backend(args.attention, dtype)
        dial = Dial(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                    window_pattern=args.window_pattern, vocab_size=tok.vocab_size)
        config = dial.config
        check_model_fits(flops.num_scaling_params(config)["total"], f"--depth {args.depth}")
        mesh = sharding.make_mesh(args.mesh)
        plan = make_plan(args, dial, mesh)
        sharding.validate(config, mesh, plan.rows_per_micro)
        moved = prepare_run_dir(out_dir, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, RunDirError) as e:
        raise SystemExit(f"error: {e}") from None
    with removed_on_failure(out_dir, main_proc), StopSignals() as stop:
        return _train(args, tag, out_dir, data_dir, tok, dtype, config, mesh, plan, main_proc, moved, stop)


def _train(args, tag, out_dir, data_dir, tok, dtype, config, mesh, plan, main_proc, moved, stop):
    bar = tqdm(total=plan.num_iterations, disable=not main_proc or not sys.stderr.isatty(), desc=f"base_train {tag}")
    # messages go above the bar, never through it
    say = (print if bar.disable else tqdm.write) if main_proc else (lambda *a, **k: None)
    if moved:
        say(f"moved the previous run in {out_dir} to {moved}")
    say(flops.summary(config))
    say(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].device_kind} device(s), "
        f"{jax.process_count()} process(es); compute {dtype.name}")
    say("plan: " + json.dumps(dataclasses.asdict(plan)))
    core_bundle = None
    if args.core_metric_every > 0:
        core_bundle = core_tasks.bundle_for_training(args.bundle_dir, say)

    tx = optim.optimizer_for(config, plan.num_iterations, lr_scale=plan.batch_lr_scale,
                             weight_decay=plan.muon_weight_decay, name=args.optimizer,
                             embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
                             matrix_lr=args.matrix_lr, scalar_lr=args.scalar_lr, warmup_steps=args.warmup_steps,
                             warmdown_ratio=args.warmdown_ratio,
                             final_lr_frac=args.final_lr_frac, dtype=dtype)
    train_step = make_train_step(config, tx, mesh, dtype=dtype, backend=args.attention)
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    micro_shape = (plan.grad_accum, plan.rows_per_micro, config.sequence_len)
    rows = sharding.process_rows(batch_sh, micro_shape, dim=1)
    local_rows = rows.stop - rows.start
    encode = lambda texts: tok.encode(texts, prepend=tok.bos_token_id)  # noqa: E731
    p_idx, p_cnt = jax.process_index(), jax.process_count()
    train_iter = iter(pretrain_loader(data_dir, encode, tok.bos_token_id, local_rows, config.sequence_len,
                                      process_index=p_idx, process_count=p_cnt))
    eval_batches = None
    if args.eval_every > 0:
        n_eval = max(1, args.eval_tokens // (plan.rows_per_micro * config.sequence_len))
        eval_batches = val_batches(data_dir, encode, tok.bos_token_id, local_rows, config.sequence_len, n_eval,
                                   process_index=p_idx, process_count=p_cnt)
        eval_batches = [{k: sharding.global_batch(v, sharding.batch_sharding(mesh)) for k, v in b.items()}
                        for b in eval_batches]

    ckpt = open_checkpointer(out_dir, args.keep_checkpoints)
    loop = {"min_val_bpb": float("inf"), "ema_smooth": 0.0, "ema_n": 0, "total_training_time": 0.0}
    step, val_bpb = 0, None
    if args.resume:
        state, meta = resume(ckpt, args.resume_step, abstract_train_state(config, tx, mesh, dtype), train_iter,
                             config, say)
        step, loop, val_bpb = meta["step"], meta["loop_state"], meta.get("val_bpb")
        say(f"resumed from step {step} ({out_dir / 'checkpoints'})")
    else:
        state = init_train_state(config, tx, mesh, jax.random.key(args.seed), dtype)
    resume_step = step

    logger = RunLogger(out_dir, enabled=main_proc)
    peak = peak_flops()
    tokens_per_step = plan.total_batch_size
    backend = args.attention
    bar.update(step)
    first_step_s = core_metric = None

    def save(step):
        meta = {"step": step, "val_bpb": val_bpb, "model_config": config.to_dict(), "user_config": vars(args),
                "plan": dataclasses.asdict(plan), "device_batch_size": args.device_batch_size,
                "max_seq_len": config.sequence_len, "total_batch_size": plan.total_batch_size, "loop_state": dict(loop)}
        ckpt.save(step, state, data_iterator=train_iter, meta=meta)

    def evaluate(step, last):
        nonlocal val_bpb, core_metric
        if eval_batches is not None and (last or step % args.eval_every == 0):
            val_bpb = evaluate_bpb(state.params, eval_batches, config, tok.token_bytes, dtype=dtype, backend=backend)
            loop["min_val_bpb"] = min(loop["min_val_bpb"], val_bpb)
            say(f"step {step:05d} | val bpb {val_bpb:.4f}")
            logger.log(step, **{"val/bpb": val_bpb})
        if core_bundle is not None and (last or (step > 0 and step % args.core_metric_every == 0)):
            scorer = core_eval.model_scorer(state.params, config, dtype=dtype, backend=backend, mesh=mesh)
            out = core_eval.evaluate_core(scorer, tok, core_bundle, max_per_task=args.core_metric_max_per_task,
                                          batch_tokens=plan.rows_per_micro * config.sequence_len,
                                          progress=main_proc and sys.stderr.isatty(), log=say)
            core_metric = out["core_metric"]
            say(f"step {step:05d} | CORE metric {core_metric:.4f} ({out['num_tasks']}/{out['total_tasks']} tasks)")
            logger.log(step, core_metric=core_metric, **{f"core/{k}": v for k, v in out["centered_results"].items()})
        if main_proc and args.sample_every > 0 and (last or (step > 0 and step % args.sample_every == 0)):
            for line in sample(jax.device_get(state.params), config, tok, dtype, backend):
                say("  sample: " + line.replace("\n", " "))

    def train(step):
        nonlocal state
        micro, inputs, targets = next_batch(train_iter, plan.grad_accum, batch_sh)
        state, metrics = train_step(state, inputs, targets)
        return {"loss": float(metrics["loss"])}

    def show(info, metrics):
        nonlocal first_step_s
        if first_step_s is None:
            first_step_s = info.dt
            say(f"first step (compile + run) {info.dt:.1f}s")
        if info.step == 0:
            gc.collect()
            gc.freeze()  # nothing allocated so far needs scanning again (upstream does the same)
        lrm = float(optim.lr_multiplier(info.step, plan.num_iterations, args.warmup_steps, args.warmdown_ratio,
                                        args.final_lr_frac))
        step_mfu = mfu(plan.flops_per_token, tokens_per_step, info.dt, jax.device_count(), peak)
        line = format_step_line(step=info.step, num_steps=plan.num_iterations, loss=info.loss, lrm=lrm, dt=info.dt,
                                tokens_per_step=tokens_per_step, mfu=step_mfu, total_time=info.total_time,
                                eta=info.timer.eta(plan.num_iterations - info.step - 1))
        return line, f"loss {info.loss:.4f} | {tokens_per_step / info.dt:,.0f} tok/s", {
            "train/loss": info.loss, "train/loss_raw": metrics["loss"], "train/lrm": lrm, "train/dt": info.dt,
            "train/tok_per_s": tokens_per_step / info.dt, **({"train/mfu": step_mfu} if step_mfu is not None else {})}

    # after a resume only the first step (compile) is left out of total_training_time
    step, final_loss = run(step, done=lambda step: step == plan.num_iterations, train=train, show=show, loop=loop,
                           bar=bar, say=say, logger=logger, evaluate=evaluate, save=save, save_every=args.save_every,
                           on_disk=resume_step, ckpt=ckpt, out_dir=out_dir, stop=stop,
                           timing_skip=TIMING_SKIP_STEPS if resume_step == 0 else 1)
    ckpt.wait()
    if main_proc:
        if torch_available():
            export_nanochat_checkpoint(jax.device_get(state.params), config, out_dir / "nanochat", step=step,
                                       meta={"val_bpb": val_bpb, "user_config": vars(args)})
        else:
            say("nanochat .pt export skipped: it needs torch (pip install 'nanochat-jax[torch]'); "
                "the Orbax checkpoints hold the model")
        write_report(out_dir, f"base_train {tag}", {
            "model": {"depth": args.depth, "n_embd": config.n_embd, "params": flops.num_scaling_params(config)["total"],
                      "flops_per_token": plan.flops_per_token},
            "run": {**dataclasses.asdict(plan), "mesh": dict(mesh.shape), "dtype": dtype.name,
                    "first_step_s": first_step_s, "total_training_time_s": loop["total_training_time"],
                    "final_val_bpb": val_bpb, "min_val_bpb": loop["min_val_bpb"], "final_train_loss": final_loss,
                    "final_core_metric": core_metric},
        }, out_dir / "metrics.jsonl")
        say(f"done: {step} steps, val bpb {val_bpb}, checkpoints in {out_dir / 'checkpoints'}, "
            + (f"nanochat export in {out_dir / 'nanochat'}, " if torch_available() else "")
            + f"report {out_dir / 'report.md'}")
    logger.close()
    ckpt.close()
    if hasattr(train_iter, "close"):
        train_iter.close()


if __name__ == "__main__":
    sys.exit(run_cli(main))
