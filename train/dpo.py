"""Preference optimization (DPO or IPO) after SFT: a chat checkpoint + preference pairs → a chat model.

    python -m train.dpo                                          # newest SFT run, HH-RLHF, DPO β=0.1
    python -m train.dpo --sft-dir out/chatsft_checkpoints/d4 --mixture 'chatterbot-pairs[:-100]' \
        --val-mixture 'chatterbot-pairs[-100:]' --max-seq-len 128  # offline, e.g. the CPU demo

The policy starts from the SFT (or RL) checkpoint's weights; a frozen copy of them is the
reference. Each pair is two rows (prompt + chosen reply, prompt + rejected reply; only the reply
carries log-prob, by the chat template's mask), never packed, the prompt cropped from its start
when needed (nanochat_jax/data/preference.py states the rule; crops and skips are logged). The
reference scores each pair's rows in the step that first sees it; with --epochs > 1 those numbers
are cached with the data stream's state and reused. Optimizer: nanochat's Muon + AdamW with the
SFT run's LRs × --init-lr-frac (fresh moments: DPO's gradients are not SFT's), no weight decay,
LR flat then linear to 0 like SFT.

Evaluation on held-out pairs at step 0 and every --eval-every steps: implicit-reward accuracy
and margin (vs the reference), and how often the model itself finds the chosen reply more likely
(log π(chosen) > log π(rejected)); val bpb on SFT conversations (the SFT run's own val mixture by
default) shows what DPO does to plain likelihood; ChatCORE at the start and the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from nanochat_jax import optim, sharding
from nanochat_jax.checkpoint import (Checkpointer, RunDirError, checkpoint_dir, newest_run,
                                     prepare_run_dir)
from nanochat_jax.common import need, resolve_dtype
from nanochat_jax.config import GPTConfig
from nanochat_jax.paths import home_dir, tokenizer_dir
from nanochat_jax.data.preference import PreferencePairIterDataset, parse_preference_mixture, render_pair
from nanochat_jax.data.sft import SFTPackIterDataset, sft_lr_multiplier
from nanochat_jax.dpo import LOSSES, check_hparams, make_dpo_step, make_logps_fn
from nanochat_jax.evals.bpb import evaluate_bpb
from nanochat_jax.loop import add_run_args, any_process, next_batch, open_checkpointer, run, start_run
from nanochat_jax.report import RunLogger, _plot, _series, read_metrics, write_report
from nanochat_jax.tasks.spec import parse_mixture
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train_step import abstract_train_state, init_train_state

FALLBACK_LRS = {"embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02}
PREF_KEYS = ("acc", "margin", "logp_acc", "chosen_logp", "rejected_logp")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--sft-dir", default=None, help="SFT or RL run dir (default: the newest under $NANOCHAT_JAX_HOME/chatsft_checkpoints)")
    a("--sft-step", type=int, default=None, help="its checkpoint step (default: latest)")
    a("--mixture", default="hh-rlhf@train", help="training pairs (nanochat_jax/data/preference.py)")
    a("--val-mixture", default="hh-rlhf@test[:1000]", help="held-out pairs, or 'none'")
    a("--sft-val-mixture", default=None, help="SFT conversations for val bpb (default: the SFT run's --val-mixture; "
      "'none': skip)")
    a("--loss", default="dpo", choices=LOSSES)
    a("--beta", type=float, default=0.1, help="DPO's β (IPO's τ)")
    a("--label-smoothing", type=float, default=0.0, help="probability that a pair's label is wrong (dpo only)")
    a("--epochs", type=int, default=1)
    a("--num-iterations", type=int, default=-1, help="train exactly this many steps (-1: --epochs over the pairs)")
    a("--max-seq-len", type=int, default=None, help="tokens per row (default: the SFT run's)")
    a("--device-batch-size", type=int, default=4, help="pairs per device per micro-step (2 rows each)")
    a("--pairs-per-step", type=int, default=32, help="pairs per optimizer step (a multiple of one micro-step's)")
    a("--embedding-lr", type=float, default=None, help="default: the SFT run's")
    a("--unembedding-lr", type=float, default=None)
    a("--matrix-lr", type=float, default=None)
    a("--scalar-lr", type=float, default=0.5)
    a("--init-lr-frac", type=float, default=0.1, help="every LR times this")
    a("--warmdown-ratio", type=float, default=0.5)
    a("--final-lr-frac", type=float, default=0.0)
    a("--eval-every", type=int, default=50, help="held-out pairs and val bpb every N steps (and at the end); -1: never")
    a("--eval-pairs", type=int, default=1000, help="held-out pairs per evaluation (at most)")
    a("--eval-tokens", type=int, default=40 * 524288, help="SFT val tokens for bpb")
    a("--chatcore-every", type=int, default=0, help="ChatCORE at the start and the end (0), also every N steps (N > 0), "
      "or never (-1)")
    a("--chatcore-tasks", default="ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval")
    a("--chatcore-max-cat", type=int, default=-1, help="categorical problems per task (-1: all)")
    a("--chatcore-max-sample", type=int, default=24, help="generative problems per task")
    a("--task-data-dir", default=None, help="local task data: DIR/<task>/, e.g. DIR/hh-rlhf/")
    a("--save-every", type=int, default=-1)
    a("--resume", action="store_true", help="continue from the latest complete checkpoint in --out-dir")
    add_run_args(a, "default $NANOCHAT_JAX_HOME/chatdpo_checkpoints/<tag>")
    return ap.parse_args(argv)


def check_args(args) -> None:
    check_hparams(args.loss, args.beta, args.label_smoothing)
    need(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")


def load_start(args):
    """(host params, config, meta, checkpoint dir) of the SFT/RL checkpoint DPO starts from."""
    try:
        run = Path(args.sft_dir) if args.sft_dir else Path(newest_run(home_dir() / "chatsft_checkpoints"))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}; train a chat model (python -m train.sft) or pass --sft-dir") from None
    ckpt_dir = checkpoint_dir(run)
    try:
        with Checkpointer(ckpt_dir, async_save=False, read_only=True) as ckpt:  # never writes into the SFT run
            tree, meta = ckpt.restore_state_tree(args.sft_step)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load the starting checkpoint from {ckpt_dir}: {e}") from None
    if "model_config" not in meta:
        raise SystemExit(f"error: {ckpt_dir} step {meta.get('step')} has no model_config in its meta")
    return jax.device_get(tree["params"]), GPTConfig.from_dict(meta["model_config"]), meta, ckpt_dir


def _allsum(values: np.ndarray) -> np.ndarray:
    """Sum of a small host array over processes (a no-op for one)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


class PairEval:
    """Held-out pairs, rendered once into fixed batches; score(params) → per-pair (chosen, rejected) log-probs."""

    def __init__(self, tasks, tok, T, pairs_global, local_pairs, mesh, logps_fn, max_pairs, p_idx, p_cnt):
        n = min(len(tasks), max_pairs)
        loader = iter(PreferencePairIterDataset(lambda i: render_pair(tok, tasks[i]), n, local_pairs, T,
                                                tok.bos_token_id, process_index=p_idx, process_count=p_cnt))
        self.batches, self.keep = [], []
        seen = set()
        sh = sharding.batch_sharding(mesh)
        for _ in range(math.ceil(n / pairs_global)):  # the same count on every process; skips only add coverage
            b = next(loader)
            fresh = np.zeros(len(b["pair_ids"]), bool)  # a batch may wrap around to pairs already taken
            for k, i in enumerate(b["pair_ids"].tolist()):
                fresh[k] = i not in seen
                seen.add(i)
            self.batches.append((sharding.global_batch(b["inputs"], sh), sharding.global_batch(b["targets"], sh)))
            self.keep.append(fresh)
        self.cropped, self.skipped = b["cropped"], b["skipped"]
        self.logps_fn = logps_fn
        rows = sharding.process_rows(sh, (2 * pairs_global, T), dim=0)
        self.local = slice(rows.start, rows.stop)

    def score(self, params) -> np.ndarray:
        """(pairs, 2) log-probs of this process's held-out pairs, in a fixed order."""
        out = []
        for (x, y), keep in zip(self.batches, self.keep):
            lp = np.asarray(jax.device_get(self.logps_fn(params, x, y)))[self.local].reshape(-1, 2)
            out.append(lp[keep])
        return np.concatenate(out)


def pref_metrics(policy_N2: np.ndarray, ref_N2: np.ndarray, beta: float) -> dict:
    """Held-out means over all processes' pairs: acc (implicit reward, tie = half), margin, logp_acc."""
    h = (policy_N2[:, 0] - ref_N2[:, 0]) - (policy_N2[:, 1] - ref_N2[:, 1])
    acc = np.where(h > 0, 1.0, np.where(h == 0, 0.5, 0.0))
    sums = _allsum(np.asarray([acc.sum(), beta * h.sum(), (policy_N2[:, 0] > policy_N2[:, 1]).sum(),
                               policy_N2[:, 0].sum(), policy_N2[:, 1].sum(), len(h)], np.float64))
    n = max(sums[-1], 1)
    return dict(zip(PREF_KEYS, (sums[:-1] / n).tolist()))


def main(argv=None):
    args = parse_args(argv)
    main_proc = start_run(args, check_args)
    say = print if main_proc else (lambda *a, **k: None)
    dtype = resolve_dtype(args.dtype)
    try:
        tok = Tokenizer.load(Path(args.tokenizer_dir) if args.tokenizer_dir else tokenizer_dir())
        mesh = sharding.make_mesh(args.mesh)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    params, config, start_meta, start_dir = load_start(args)
    try:
        train_tasks = parse_preference_mixture(args.mixture, args.task_data_dir)
        val_tasks = None if args.val_mixture == "none" else parse_preference_mixture(args.val_mixture, args.task_data_dir)
        sft_val = args.sft_val_mixture or start_meta.get("user_config", {}).get("val_mixture") or "none"
        sft_val_tasks = None if sft_val == "none" else parse_mixture(sft_val, args.task_data_dir)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    if tok.vocab_size > config.vocab_size:
        raise SystemExit(f"error: tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}")
    T = args.max_seq_len or start_meta.get("max_seq_len") or config.sequence_len
    config = dataclasses.replace(config, sequence_len=T)
    inherited = start_meta.get("inherited", {})
    lrs = {k: getattr(args, k) if getattr(args, k) is not None else inherited.get(k, fb) for k, fb in FALLBACK_LRS.items()}
    batch_axes = mesh.shape["data"] * mesh.shape["fsdp"]
    pairs_micro = args.device_batch_size * batch_axes
    if args.device_batch_size < 1 or args.pairs_per_step % pairs_micro:
        raise SystemExit(f"error: --pairs-per-step {args.pairs_per_step} is not a multiple of one micro-step "
                         f"({args.device_batch_size} pairs x {batch_axes} devices); change --pairs-per-step "
                         "or --device-batch-size")
    grad_accum = args.pairs_per_step // pairs_micro
    n_pairs = len(train_tasks)
    num_steps = args.num_iterations if args.num_iterations > 0 else max(1, round(args.epochs * n_pairs / args.pairs_per_step))
    tag = args.model_tag or f"d{config.n_layer}"
    out_dir = Path(args.out_dir) if args.out_dir else home_dir() / "chatdpo_checkpoints" / tag
    try:  # one directory, one run: never mix this run's checkpoints with an earlier one's
        moved = prepare_run_dir(out_dir, resume=args.resume, overwrite=args.overwrite)
    except RunDirError as e:
        raise SystemExit(f"error: {e}") from None
    if moved:
        say(f"moved the earlier run aside to {moved}")
    start = {"dir": str(start_dir), "step": start_meta.get("step")}
    say(f"dpo: {start_dir} step {start['step']} -> {out_dir}; {n_pairs:,} pairs, {args.loss} beta={args.beta}, T={T}, "
        f"{pairs_micro} pairs x {grad_accum} micro-steps per step, {num_steps} steps, "
        f"LRs {json.dumps(lrs)} x {args.init_lr_frac}")

    f = args.init_lr_frac
    tx = optim.make_optimizer(config, 1, embedding_lr=lrs["embedding_lr"], unembedding_lr=lrs["unembedding_lr"],
                              matrix_lr=lrs["matrix_lr"], scalar_lr=args.scalar_lr, weight_decay=0.0, dtype=dtype,
                              lr_schedule=lambda it: f, momentum_schedule=optim.finetune_momentum)
    state = init_train_state(config, tx, mesh, jax.random.key(0), dtype, params=params)
    reference = jax.device_put(params, jax.tree.map(lambda a: a.sharding, state.params))  # its own buffers: state is donated
    del params

    p_idx, p_cnt = jax.process_index(), jax.process_count()
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    rows = sharding.process_rows(batch_sh, (grad_accum, 2 * pairs_micro, T), dim=1)
    local_pairs = (rows.stop - rows.start) // 2
    loader = PreferencePairIterDataset(lambda i: render_pair(tok, train_tasks[i]), n_pairs, local_pairs, T,
                                       tok.bos_token_id, process_index=p_idx, process_count=p_cnt)
    train_iter = iter(loader)
    logps_fn = make_logps_fn(config, mesh, dtype=dtype, backend=args.attention)
    pair_eval = ref_val = None
    if val_tasks is not None and args.eval_every != -1:
        pair_eval = PairEval(val_tasks, tok, T, pairs_micro, local_pairs, mesh, logps_fn, args.eval_pairs, p_idx, p_cnt)
        ref_val = pair_eval.score(reference)
        say(f"held-out pairs: {int(_allsum(np.asarray([len(ref_val)]))[0])} ({pair_eval.cropped} cropped, "
            f"{pair_eval.skipped} skipped as too long)")
    bpb_batches = None
    if sft_val_tasks is not None and args.eval_every != -1:
        bpb_rows = sharding.process_rows(sharding.batch_sharding(mesh), (2 * pairs_micro, T), dim=0)
        it = iter(SFTPackIterDataset(lambda i: tok.render_conversation(sft_val_tasks[i], max_tokens=T + 1),
                                     len(sft_val_tasks), bpb_rows.stop - bpb_rows.start, T, tok.bos_token_id,
                                     process_index=p_idx, process_count=p_cnt))
        bpb_batches = []
        for _ in range(max(1, args.eval_tokens // (2 * pairs_micro * T))):
            b = next(it)
            bpb_batches.append({k: sharding.global_batch(b[k], sharding.batch_sharding(mesh)) for k in ("inputs", "targets")})
            if b["consumed"] >= len(sft_val_tasks):
                break
    chat_tasks = None
    if args.chatcore_every >= 0 and p_cnt > 1:
        say("note: ChatCORE during DPO runs single-process only; evaluate after with python -m train.chat_eval")
    elif args.chatcore_every >= 0:
        from train.sft import load_chatcore_tasks
        chat_tasks = load_chatcore_tasks(args, say)

    ckpt = open_checkpointer(out_dir, 2)
    step = 0
    loop = {"ema_smooth": 0.0, "ema_n": 0, "total_training_time": 0.0, "first": {}, "last": {}}
    if args.resume:
        if ckpt.latest_step() is None:
            raise SystemExit(f"error: --resume but there is no complete checkpoint in {out_dir / 'checkpoints'}")
        saved = ckpt.read_meta()
        if saved.get("start") != start:
            raise SystemExit(f"error: --resume: the run started from {saved.get('start')}, not {start}; pass that "
                             "--sft-dir/--sft-step")
        state, meta = ckpt.restore(target=abstract_train_state(config, tx, mesh, dtype), data_iterator=train_iter,
                                   config=config)
        step, loop = meta["step"], meta["loop_state"]
        say(f"resumed from step {step}")
    resume_step = step

    steps = {mode: make_dpo_step(config, tx, mesh, loss_type=args.loss, beta=args.beta,
                                 label_smoothing=args.label_smoothing, dtype=dtype, backend=args.attention,
                                 with_reference=mode) for mode in (True, False)}
    ref_sh = NamedSharding(mesh, P(None, sharding.BATCH))
    logger = RunLogger(out_dir, enabled=main_proc)
    bar = tqdm(total=num_steps, initial=step, disable=not main_proc or not sys.stderr.isatty(), desc=f"dpo {tag}")
    batch = {"cropped": 0, "skipped": 0}

    def save(step):
        meta = {"step": step, "model_config": config.to_dict(), "user_config": vars(args), "start": start,
                "lrs": lrs, "max_seq_len": T, "inherited": {**lrs, "max_seq_len": T}, "loop_state": dict(loop)}
        ckpt.save(step, state, data_iterator=train_iter, meta=meta)

    def evaluate(step, last):
        due = last or (args.eval_every > 0 and step % args.eval_every == 0) or step == 0
        if pair_eval is not None and due:
            m = pref_metrics(pair_eval.score(state.params), ref_val, args.beta)
            say(f"step {step:05d} | held-out pairs: reward acc {m['acc']:.4f} | margin {m['margin']:.4f} | "
                f"logp acc {m['logp_acc']:.4f} | chosen logp {m['chosen_logp']:.2f} | rejected logp {m['rejected_logp']:.2f}")
            logger.log(step, **{f"pref/{k}": v for k, v in m.items()})
            loop["first"] = loop["first"] or m
            loop["last"] = m
        if bpb_batches is not None and due:
            bpb = evaluate_bpb(state.params, bpb_batches, config, tok.token_bytes, dtype=dtype, backend=args.attention)
            say(f"step {step:05d} | SFT val bpb {bpb:.4f}")
            logger.log(step, **{"val/bpb": bpb})
            loop.setdefault("first_bpb", bpb)
            loop["last_bpb"] = bpb
        if chat_tasks and (last or step == 0 or (args.chatcore_every > 0 and step % args.chatcore_every == 0)) \
                and not (step == resume_step and step > 0):
            from train.sft import run_chatcore
            scores = run_chatcore(state.params, config, tok, dtype, chat_tasks, args, args.device_batch_size)
            say(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            logger.log(step, **{(k if k.startswith("chatcore") else f"chatcore/{k}"): v for k, v in scores.items()})
            loop.setdefault("first_chatcore", scores.get("chatcore"))
            loop["last_chatcore"] = scores.get("chatcore")

    def train(step):
        nonlocal state, batch
        micro, inputs, targets = next_batch(train_iter, grad_accum, batch_sh)
        batch = micro[-1]
        lrm = sft_lr_multiplier((step + 1) / num_steps, args.warmdown_ratio, args.final_lr_frac)
        fresh = any_process(any(b["ref_logps"] is None for b in micro))
        ref = reference if fresh else sharding.global_batch(np.stack([b["ref_logps"] for b in micro]), ref_sh)
        state, metrics = steps[fresh](state, ref, inputs, targets, lrm)
        metrics = jax.device_get(metrics)
        if fresh and args.epochs > 1:
            ref_rows = np.asarray(metrics["ref_logps"])[:, rows.start:rows.stop]
            for b, r in zip(micro, ref_rows):
                train_iter.remember(b["pair_ids"], r)
        return {**{k: float(v) for k, v in metrics.items() if k != "ref_logps"}, "lrm": lrm, "fresh": fresh}

    def show(info, m):
        line = (f"step {info.step:05d}/{num_steps:05d} | loss: {info.loss:.6f} | reward acc: {m['reward_acc']:.3f} | "
                f"margin: {m['margin']:.3f} | lrm: {m['lrm']:.2f} | dt: {info.dt * 1000:.0f}ms | "
                f"epoch: {batch['epoch']}{'' if m['fresh'] else ' | cached ref'}")
        return line, f"loss {info.loss:.4f} acc {m['reward_acc']:.2f}", {
            "train/loss": info.loss, "train/loss_raw": m["loss"], "train/lrm": m["lrm"], "train/dt": info.dt,
            **{f"train/{k}": v for k, v in m.items() if k not in ("loss", "lrm", "fresh")},
            "data/cropped": batch["cropped"], "data/skipped": batch["skipped"]}

    step, final_loss = run(step, done=lambda step: step >= num_steps, train=train, show=show, loop=loop, bar=bar,
                           say=say, logger=logger, evaluate=evaluate, save=save, save_every=args.save_every,
                           on_disk=resume_step)
    ckpt.wait()
    counts = {"cropped": int(_allsum(np.asarray([batch["cropped"]]))[0]),
              "skipped": int(_allsum(np.asarray([batch["skipped"]]))[0])}
    if main_proc:
        first, final = loop["first"], loop["last"]
        if first:
            say(f"held-out preference accuracy (implicit reward): {100 * first['acc']:.1f}% -> {100 * final['acc']:.1f}%"
                f" | model prefers chosen (log-prob): {100 * first['logp_acc']:.1f}% -> {100 * final['logp_acc']:.1f}%"
                f" | margin {first['margin']:.3f} -> {final['margin']:.3f}")
        write_dpo_report(out_dir, tag, config, args, loop, counts, step, grad_accum, n_pairs, final_loss)
        say(f"done: {step} steps, checkpoint in {out_dir / 'checkpoints'}")
    logger.close()
    ckpt.close()


def write_dpo_report(out_dir: Path, tag, config, args, loop, counts, steps, grad_accum, n_pairs, final_loss) -> Path:
    """report.md with SFT's summary, loss and bpb plots, plus the preference curves."""
    records = read_metrics(out_dir / "metrics.jsonl")
    plots = [("train/reward_acc", "reward_acc.png", "reward accuracy", "train reward accuracy"),
             ("train/margin", "margin.png", "β·h", "train reward margin"),
             ("pref/acc", "heldout_acc.png", "accuracy", "held-out reward accuracy"),
             ("pref/logp_acc", "heldout_logp_acc.png", "accuracy", "held-out: log π(chosen) > log π(rejected)"),
             ("train/chosen_logp", "chosen_logp.png", "nats", "train chosen log-prob"),
             ("train/rejected_logp", "rejected_logp.png", "nats", "train rejected log-prob")]
    for key, name, ylabel, title in plots:
        _plot(_series(records, key), out_dir / name, ylabel, title)
    first, final = loop.get("first") or {}, loop.get("last") or {}
    before_after = {f"held-out {k}": f"{first[k]:.4f} -> {final[k]:.4f}" for k in PREF_KEYS if k in first}
    for key, what in (("bpb", "SFT val bpb"), ("chatcore", "ChatCORE")):
        if loop.get(f"first_{key}") is not None:
            before_after[what] = f"{loop[f'first_{key}']:.4f} -> {loop[f'last_{key}']:.4f}"
    return write_report(out_dir, f"dpo {tag}", {
        "model": {"depth": config.n_layer, "n_embd": config.n_embd, "sequence_len": config.sequence_len},
        "run": {"steps": steps, "pairs": n_pairs, "grad_accum": grad_accum, "mixture": args.mixture,
                "val_mixture": args.val_mixture, "loss": args.loss, "beta": args.beta,
                "label_smoothing": args.label_smoothing, "epochs": args.epochs, "final_train_loss": final_loss,
                "pairs_cropped": counts["cropped"], "pairs_skipped": counts["skipped"],
                "total_training_time_s": loop["total_training_time"]},
        "before -> after": before_after,
        "Preference curves": "\n\n".join(f"![{p[3]}]({p[1]})" for p in plots),
    }, out_dir / "metrics.jsonl")


if __name__ == "__main__":
    main()
