"""Reinforcement learning on GSM8K: on-policy REINFORCE, nanochat's reduced "GRPO".

    python -m train.rl                                  # newest SFT run, GSM8K train, 1 epoch
    python -m train.rl --task 'gsm8k@train[:64]' --num-samples 8 --max-new-tokens 128

Per step, each of examples_per_step questions gets num_samples completions from the jitted
engine (batched: one prefill, device_batch_size rows per pass); a completion's reward comes
from the task's checker; the advantage is reward − mean reward of its question (no std, no
KL, no clipping); the loss is −Σ logp·A over sampled tokens, normalized per token of each pass
(DAPO-style). Forced calculator output and the prompt carry no loss. LR decays linearly to 0.

Every argument, the tokenizer and the SFT checkpoint are checked before any task download; the
output directory holds one run (--overwrite moves an old one aside); SIGINT/SIGTERM stop after the
current step with a final checkpoint (docs/training.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from nanochat_jax import optim, sharding
from nanochat_jax.checkpoint import (Checkpointer, CheckpointError, RunDirError, check_writable, checkpoint_dir,
                                     load_params, newest_run, prepare_run_dir)
from nanochat_jax.common import DTYPES, StopSignals, need, resolve_dtype, run_cli, tune_malloc
from nanochat_jax.config import GPTConfig
from nanochat_jax.loop import removed_on_failure, run
from nanochat_jax.paths import home_dir, tokenizer_dir
from nanochat_jax.report import RunLogger, write_report
from nanochat_jax.scheduler import Engine
from nanochat_jax.tasks.common import Task
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train_step import init_train_state, make_train_step


@dataclasses.dataclass
class RLConfig:
    num_epochs: int = 1
    num_steps: int = -1  # -1: len(task) // examples_per_step · num_epochs
    examples_per_step: int = 16
    num_samples: int = 16
    device_batch_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    init_lr_frac: float = 0.05
    eval_every: int = 60
    eval_examples: int = 400
    save_every: int = 60

    def check(self) -> None:
        """Ranges (ValueError), so a typo fails before any model or task is loaded."""
        for name in ("num_epochs", "examples_per_step", "num_samples", "device_batch_size", "max_new_tokens",
                     "eval_examples"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        need(self.num_steps == -1 or self.num_steps >= 1,
             f"--num-steps must be >= 1, or -1 for num_epochs over the task; got {self.num_steps}")
        for name in ("temperature", "top_k", "embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "init_lr_frac"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        need(self.num_samples % self.device_batch_size == 0,
             f"--num-samples {self.num_samples} must be a multiple of --device-batch-size {self.device_batch_size}")


def rollout_batch(engine: Engine, conv: dict, task: Task, cfg: RLConfig, seed: int, seq_len: int, pad_id: int):
    """num_samples completions of one question → (ids, mask) rows of seq_len+1, rewards, lengths.

    Sequences are prompt + generation (no terminal <|assistant_end|>), right-padded with pad_id;
    mask 1 only on sampled tokens.
    """
    tok = engine.tokenizer
    prompt = tok.render_for_completion(conv)
    ids = np.full((cfg.num_samples, seq_len + 1), pad_id, np.int32)
    mask = np.zeros((cfg.num_samples, seq_len + 1), np.int8)
    rewards, lengths = np.zeros(cfg.num_samples, np.float32), np.zeros(cfg.num_samples, np.int32)
    row = 0
    for p in range(cfg.num_samples // cfg.device_batch_size):
        room = min(cfg.max_new_tokens, seq_len + 1 - len(prompt))
        if room < 1:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in the {seq_len}-token context")
        outs = engine.complete(prompt, num_samples=cfg.device_batch_size, max_tokens=room,
                               temperature=cfg.temperature, top_k=cfg.top_k,
                               seed=hash((seed, p)) & 0x7FFFFFFF)
        for c in outs:
            seq = prompt + list(c.tokens)
            ids[row, :len(seq)] = seq
            mask[row, len(prompt):len(seq)] = c.masks
            rewards[row] = task.reward(conv, tok.decode(c.tokens))
            lengths[row] = len(c.tokens)
            row += 1
    return ids, mask, rewards, lengths


def pass_at_k(engine: Engine, task: Task, n: int, k: int, cfg: RLConfig, seed: int = 0) -> np.ndarray:
    """pass@1..k over the first n problems: k samples each at the rollout temperature."""
    hits = np.zeros(k)
    n = min(n, len(task))
    for i in range(n):
        conv = task[i]
        prompt = engine.tokenizer.render_for_completion(conv)
        outs = engine.complete(prompt, num_samples=k, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_k=cfg.top_k, seed=seed + i)
        ok = np.array([task.evaluate(conv, engine.tokenizer.decode(c.tokens)) for c in outs], bool)
        hits += np.maximum.accumulate(ok)
    return hits / max(n, 1)


def train(params, config: GPTConfig, tok: Tokenizer, task: Task, cfg: RLConfig, *, val_task: Task | None = None,
          out_dir: Path | None = None, mesh_spec: str = "data=-1", mesh=None, dtype=None, say=print,
          stop: StopSignals | None = None) -> tuple[dict, list[dict]]:
    """Runs RL from params; returns (final params, per-step records {step, reward, seq_len, lrm, pass@k?}).
    stop (installed StopSignals): a signal ends the run after the current step, with a final checkpoint."""
    dtype = resolve_dtype(dtype)
    if cfg.num_samples % cfg.device_batch_size:
        raise ValueError(f"num_samples {cfg.num_samples} must be a multiple of device_batch_size {cfg.device_batch_size}")
    W, rank = jax.process_count(), jax.process_index()
    if cfg.examples_per_step % W:
        raise ValueError(f"examples_per_step {cfg.examples_per_step} must divide by the {W} processes")
    per_rank = cfg.examples_per_step // W
    num_steps = cfg.num_steps if cfg.num_steps > 0 else (len(task) // cfg.examples_per_step) * cfg.num_epochs
    if num_steps < 1:
        raise ValueError(f"{len(task)} examples make no step of {cfg.examples_per_step} examples")
    f = cfg.init_lr_frac  # scales every group, the fixed-LR scalars included, as upstream's loop over param_groups
    tx = optim.make_optimizer(config, num_steps, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                              matrix_lr=cfg.matrix_lr, scalar_lr=cfg.scalar_lr, weight_decay=0.0, dtype=dtype,
                              lr_schedule=lambda it: f * (1.0 - it / num_steps), momentum_schedule=lambda it: 0.95)
    mesh = mesh or sharding.make_mesh(mesh_spec)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.device_batch_size % batch_devices:
        raise ValueError(f"device_batch_size {cfg.device_batch_size} (rows per pass) must divide over the "
                         f"{batch_devices} batch-sharded devices of mesh {mesh_spec}")
    state = init_train_state(config, tx, mesh, jax.random.key(0), dtype, params=params)
    train_step = make_train_step(config, tx, mesh, dtype=dtype)
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    passes = cfg.num_samples // cfg.device_batch_size
    T = config.sequence_len
    pad = tok.encode_special("<|assistant_end|>")
    logger = RunLogger(out_dir, enabled=out_dir is not None and sharding.is_main_process()) if out_dir else None
    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=2) if out_dir else None
    records, rec, cursor = [], {}, rank
    bar = tqdm(total=num_steps, desc="rl", disable=not sys.stderr.isatty())
    if not bar.disable and say is print:
        say = tqdm.write  # messages go above the bar, never through it

    def save(step):
        ckpt.save(step, state, meta={"step": step, "model_config": config.to_dict(), "rl_config": dataclasses.asdict(cfg)})

    def evaluate(step, last):
        nonlocal rec
        rec = {"step": step}
        if val_task is not None and cfg.eval_every > 0 and (last or step % cfg.eval_every == 0):
            engine = Engine(jax.device_get(state.params), config, tok, dtype=dtype)
            pk = pass_at_k(engine, val_task, cfg.eval_examples, cfg.device_batch_size, cfg, seed=step)
            rec.update({f"pass@{k + 1}": float(v) for k, v in enumerate(pk)})
            say(f"step {step:05d} | " + " | ".join(f"pass@{k + 1} {v:.4f}" for k, v in enumerate(pk)))

    def train(step):
        nonlocal state, cursor
        engine = Engine(jax.device_get(state.params), config, tok, dtype=dtype)
        ids, masks, rewards, lengths = [], [], [], []
        for e in range(per_rank):
            idx = cursor % len(task)
            cursor += W
            i, m, r, n = rollout_batch(engine, task[idx], task, cfg, hash((step, idx)), T, pad)
            ids.append(i), masks.append(m), rewards.append(r), lengths.append(n)
        ids, masks, rewards = np.stack(ids), np.stack(masks), np.stack(rewards)  # (E, S, T+1), (E, S)
        adv = rewards - rewards.mean(axis=1, keepdims=True)
        targets = np.where(masks[..., 1:] == 1, ids[..., 1:], -1)
        # micro-steps = (example, pass) pairs of device_batch_size rows; each pass is normalized by
        # its own valid-token count, then by passes and examples: upstream's loss scaling
        E, S = rewards.shape
        shape = (E * passes, cfg.device_batch_size, T)
        valid = (targets >= 0).reshape(shape)
        per_pass = np.maximum(valid.sum(axis=(1, 2), keepdims=True), 1)
        weights = np.where(valid, adv.reshape(E * passes, cfg.device_batch_size, 1), 0.0) / (per_pass * passes * E)
        # minus: the train step minimizes Σ CE·w = −Σ logp·w, which is exactly −objective
        state, _ = train_step(state, sharding.global_batch(ids[..., :-1].reshape(shape), batch_sh),
                              sharding.global_batch(targets.reshape(shape).astype(np.int32), batch_sh),
                              sharding.global_batch(weights.astype(np.float32), batch_sh))
        return {"reward": float(rewards.mean()), "seq_len": float(np.mean(lengths)), "lrm": 1 - step / num_steps}

    def show(info, m):
        rec.update(m, dt=info.dt)
        records.append(rec)
        eta = info.timer.eta(num_steps - info.step - 1)
        line = f"step {info.step:05d}/{num_steps:05d} | reward {rec['reward']:.4f} | seq len {rec['seq_len']:.1f} | " \
               f"lrm {rec['lrm']:.3f} | dt {rec['dt']:.2f}s" + (f" | eta: {eta / 60:.1f}m" if eta is not None else "")
        return line, f"reward {rec['reward']:.3f} | {rec['dt']:.2f}s/step", {
            f"rl/{k}": v for k, v in rec.items() if k != "step"}

    run(0, done=lambda step: step == num_steps, train=train, show=show, loop={}, bar=bar, say=say, logger=logger,
        evaluate=evaluate, save=save if ckpt else None, save_every=cfg.save_every, ckpt=ckpt, out_dir=out_dir,
        stop=stop, hint="RL has no --resume; evaluate or serve this checkpoint as it is")
    if len(rec) > 1:  # the evals after the last step
        records.append(rec)
    if ckpt:
        ckpt.close()
    if logger:
        logger.close()
    return jax.device_get(state.params), records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--sft-dir", default=None, help="SFT run dir (default: the newest under $NANOCHAT_JAX_HOME/chatsft_checkpoints)")
    a("--task", default="gsm8k@train", help="training task entry (nanochat_jax/tasks/spec.py)")
    a("--val-task", default="gsm8k@test", help="pass@k task entry, or 'none'")
    for f in dataclasses.fields(RLConfig):
        a("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a("--task-data-dir", default=None, help="local task data: DIR/<task>/, e.g. DIR/gsm8k/")
    a("--mesh", default="data=-1")
    a("--dtype", default=None)
    a("--tokenizer-dir", default=None)
    a("--out-dir", default=None, help="default $NANOCHAT_JAX_HOME/chatrl_checkpoints/<tag>")
    a("--overwrite", action="store_true", help="move a run already in --out-dir aside to <out-dir>.replaced-<time>")
    a("--debug", action="store_true", help="tracebacks instead of one-line errors")
    a("--unsafe-exec", action="store_true",
      help="let rewards run model-written code even where no OS sandbox (bubblewrap) works: Python-level guards only")
    args = ap.parse_args(argv)
    cfg = RLConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)})
    try:
        cfg.check()
        need(args.dtype is None or args.dtype in DTYPES, f"--dtype {args.dtype!r} is not one of {sorted(DTYPES)}")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    tune_malloc()  # before the backend starts: reuse freed host memory (common.tune_malloc)
    sharding.initialize_distributed()  # multi-host: NANOCHAT_COORDINATOR etc., as runs/gpu_multinode.sh sets
    from nanochat_jax.tasks.spec import parse_entry

    # the tokenizer, the checkpoint and the output dir first: a task download may take a while
    try:
        tok = Tokenizer.load(Path(args.tokenizer_dir) if args.tokenizer_dir else tokenizer_dir())
        sft_dir = Path(args.sft_dir) if args.sft_dir else Path(newest_run(home_dir() / "chatsft_checkpoints"))
        ckpt_dir = checkpoint_dir(sft_dir)
        params, config, _ = load_params(ckpt_dir)
        out_dir = Path(args.out_dir) if args.out_dir else home_dir() / "chatrl_checkpoints" / f"d{config.n_layer}"
        moved = prepare_run_dir(out_dir, resume=False, overwrite=args.overwrite)
        check_writable(out_dir, "output directory", keep=False)
        task, _ = parse_entry(args.task, args.task_data_dir)
        val_task = None if args.val_task == "none" else parse_entry(args.val_task, args.task_data_dir)[0]
    except (ValueError, FileNotFoundError, OSError, CheckpointError, RunDirError) as e:
        raise SystemExit(f"error: {e}") from None
    if moved:
        print(f"moved the previous run in {out_dir} to {moved}")
    with removed_on_failure(out_dir):
        return _main(args, cfg, tok, ckpt_dir, params, config, out_dir, task, val_task)


def _main(args, cfg, tok, ckpt_dir, params, config, out_dir, task, val_task):
    from nanochat_jax.evals import execution
    from nanochat_jax.tasks.humaneval import HumanEval
    execution.set_unsafe_exec(args.unsafe_exec)
    if any(isinstance(t, HumanEval) for t in (task, val_task)):  # rewards that run code: refuse or warn now
        try:
            print(execution.code_execution_mode())
        except execution.SandboxUnavailable as e:
            raise SystemExit(f"error: {e}") from None
    print(f"rl: {ckpt_dir} → {out_dir}; {len(task):,} examples, {cfg.examples_per_step} per step x "
          f"{cfg.num_samples} samples")
    try:
        with StopSignals() as stop:
            _, records = train(params, config, tok, task, cfg, val_task=val_task, out_dir=out_dir,
                               mesh_spec=args.mesh, dtype=args.dtype, stop=stop)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    rewards = [r["reward"] for r in records if "reward" in r]
    write_report(out_dir, f"rl d{config.n_layer}", {"run": {
        "steps": len(rewards), "first_reward": rewards[0] if rewards else None,
        "last_reward": rewards[-1] if rewards else None, "rl_config": dataclasses.asdict(cfg),
        **{k: v for k, v in records[-1].items() if k.startswith("pass@")}}}, out_dir / "metrics.jsonl")


if __name__ == "__main__":
    sys.exit(run_cli(main))
