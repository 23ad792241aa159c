"""The host loop base_train, SFT, DPO and RL share, and the start and end of their runs.

Each pass, as upstream: stop on SIGINT/SIGTERM (with a final checkpoint), evaluate, save on the
cadence, then, unless it is the last pass, one timed optimizer step with the loss EMA, a step line
(or a bar on a TTY) and a metrics.jsonl record. A stage passes only what is its own: data and
step, evals, step line, checkpoint meta. Run directories, resume and stops: docs/training.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np

from nanochat_jax import sharding
from nanochat_jax.checkpoint import COMMIT_MARKER, Checkpointer, CheckpointError
from nanochat_jax.common import tune_malloc
from nanochat_jax.paths import home_dir
from nanochat_jax.report import LossEMA, StepTimer

STOP_SAVE_TIMEOUT_S = float(os.environ.get("NANOCHAT_STOP_SAVE_TIMEOUT", 300))  # final save on SIGINT/SIGTERM


class StepInfo(NamedTuple):
    """What the loop measured about one step, for the stage's step line."""
    step: int
    dt: float  # seconds, data included
    loss: float  # the EMA of the stage's "loss" (nan for a stage without one)
    total_time: float  # training time so far, warm-up steps left out
    timer: StepTimer  # timer.eta(steps_left)


def run(step: int, *, done: Callable[[int], bool], train: Callable[[int], dict],
        show: Callable[[StepInfo, dict], tuple[str, str, dict]], loop: dict, bar, say, logger=None,
        evaluate: Callable[[int, bool], None] | None = None, save: Callable[[int], None] | None = None,
        save_every: int = -1, on_disk: int | None = None, ckpt: Checkpointer | None = None, out_dir=None,
        stop=None, timing_skip: int = 1, hint: str = "continue with --resume") -> tuple[int, float]:
    """Runs from `step` until done(step); returns (the final step, the final EMA loss).

    train(step): one optimizer step → host metrics ("loss" feeds the EMA); show(info, metrics) →
    (step line, bar postfix, scalars to log); evaluate(step, last): the stage's evals; save(step):
    at the end and every save_every steps, never at on_disk (the step resumed from). loop
    (total_training_time, ema_smooth, ema_n) is updated in place for the checkpoint meta; its time
    leaves out the first timing_skip steps (compilation, warm-up), the ETA the first one."""
    start = step
    ema = LossEMA(beta=0.9, smooth=loop.get("ema_smooth", 0.0), n=loop.get("ema_n", 0))
    loop.setdefault("total_training_time", 0.0)
    timer = StepTimer()
    try:
        while True:
            last = done(step)
            if stop is not None and not last and stop.requested():
                bar.close()
                stop_with_checkpoint(ckpt, step, save if step != on_disk else None, stop, out_dir, say, hint=hint)
            if evaluate is not None:
                evaluate(step, last)
            if save is not None and (last or (save_every > 0 and step > 0 and step % save_every == 0)) and step != on_disk:
                save(step)
            if last:
                break
            t0 = time.perf_counter()
            metrics = train(step)
            dt = time.perf_counter() - t0
            if step - start >= timing_skip:
                loop["total_training_time"] += dt
            if step > start:
                timer.add(dt)
            if "loss" in metrics:
                ema.update(metrics["loss"])
                loop["ema_smooth"], loop["ema_n"] = ema.smooth, ema.n
            line, postfix, scalars = show(StepInfo(step, dt, ema.value, loop["total_training_time"], timer), metrics)
            if bar.disable:
                say(line)
            else:
                bar.update(1)
                bar.set_postfix_str(postfix)
            if logger is not None:
                logger.log(step, **scalars)
            step += 1
    except BaseException:  # a failed or stopped run still flushes and closes its TensorBoard file
        if logger is not None:
            logger.close()
        raise
    bar.close()
    return step, ema.value


def start_run(args, check, *distributed) -> bool:
    """A training CLI's start: args checked (one-line error), host memory tuned before the backend
    starts (common.tune_malloc), the processes joined, the compile cache on. Whether this is the main process."""
    try:
        check(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    tune_malloc()
    sharding.initialize_distributed(*distributed)  # multi-host: flags, else NANOCHAT_COORDINATOR etc.
    jax.config.update("jax_compilation_cache_dir", str(home_dir() / "jax_cache"))  # persistent compile cache
    return sharding.is_main_process()


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (upstream all-reduces last_step with MAX): all stop together."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def next_batch(data_iter, grad_accum: int, batch_sh):
    """grad_accum micro-batches of a stage's loader → (the host batches, inputs_ABT, targets_ABT on the mesh)."""
    micro = [next(data_iter) for _ in range(grad_accum)]
    return micro, *(sharding.global_batch(np.stack([b[k] for b in micro]), batch_sh) for k in ("inputs", "targets"))


def open_checkpointer(out_dir: Path, keep: int) -> Checkpointer:
    try:
        return Checkpointer(out_dir / "checkpoints", max_to_keep=keep)
    except OSError as e:
        raise SystemExit(f"error: cannot write the run directory {out_dir}: {e}") from None


def resume(ckpt, step, target, data_iterator, config, say):
    """(state, meta) of `step` or, by default, the newest intact checkpoint. Corrupt steps passed over
    and (with an explicit older step) newer ones are renamed aside, so this run can save those steps again."""
    try:
        state, meta = ckpt.restore(step, target=target, data_iterator=data_iterator, config=config, say=say)
    except CheckpointError as e:
        raise SystemExit(f"error: cannot resume: {e}") from None
    for bad in sorted(ckpt.bad_steps):
        say(f"moved corrupt step {bad} to {ckpt.set_aside(bad, 'corrupt')}")
    for newer in [s for s in ckpt.all_steps() if s > meta["step"]]:
        say(f"moved step {newer} (after the resumed step {meta['step']}) to {ckpt.set_aside(newer, 'superseded')}")
    return state, meta


def stop_with_checkpoint(ckpt, step, save, stop, out_dir, say, timeout_s=None, hint="continue with --resume"):
    """The end of a run stopped by a signal: save `step` (save is None when it is on disk already), wait a
    bounded time for it, and exit with a one-line message and 128 + the signal number."""
    if ckpt is None:
        print(f"stopped by {stop.name} at step {step} (no --out-dir: nothing saved)", file=sys.stderr)
        raise SystemExit(stop.exit_code)
    timeout_s = STOP_SAVE_TIMEOUT_S if timeout_s is None else timeout_s
    where = out_dir / "checkpoints"
    if save is not None:
        say(f"{stop.name}: saving a final checkpoint at step {step} (waiting up to {timeout_s:.0f}s)")
        save(step)
    if ckpt.wait(timeout=timeout_s):
        print(f"stopped by {stop.name} at step {step}; checkpoint step {step} is in {where}; {hint}", file=sys.stderr)
        raise SystemExit(stop.exit_code)
    prev = ckpt.latest_step()
    print(f"stopped by {stop.name} at step {step}; the final checkpoint did not finish within {timeout_s:.0f}s, "
          f"so the newest in {where} is step {prev}", file=sys.stderr, flush=True)
    os._exit(stop.exit_code)  # Orbax's writer threads would keep the process alive


@contextlib.contextmanager
def removed_on_failure(out_dir: Path | None, enabled: bool = True):
    """A run directory this run creates is removed again when the run fails before its first checkpoint."""
    created = out_dir is not None and not out_dir.exists()
    try:
        yield
    except BaseException:
        if created and enabled and not any(out_dir.glob(f"checkpoints/*/{COMMIT_MARKER}")):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def add_run_args(a, out_dir_help: str) -> None:
    """The arguments every chat stage takes for where and how it runs (a = ArgumentParser.add_argument)."""
    a("--overwrite", action="store_true", help="move a run already in --out-dir aside to <out-dir>.replaced-<time>")
    a("--model-tag", default=None)
    a("--mesh", default="data=-1")
    a("--dtype", default=None)
    a("--attention", default="auto")
    a("--tokenizer-dir", default=None)
    a("--out-dir", default=None, help=out_dir_help)
