"""Training checkpoints on Orbax: train state + each host's data-iterator state + JSON meta, saved async.

One step directory holds three items:

- `state`: the TrainState (params + optimizer state), every host writing its own shards;
- `data`:  each process's Grain iterator state, `process_{i}-of-{n}.json` (Grain's own
  Orbax handler), so every host resumes its own stream; optional;
- `meta`:  JSON written by process 0 only: {"step", "model_config", "user_config",
  "loop_state", ...} like nanochat's meta_{step}.json (spec §5.7).

Completion: the commit-file protocol on every filesystem. A step directory counts only
once `commit_success.txt` is in it, and Orbax writes that last, after every item and host
has finished. A save killed midway therefore leaves a step directory without the marker,
which is never listed or restored, and which the next save of that step replaces. (Orbax's
default on local disks is rename-from-`<step>.orbax-checkpoint-tmp` instead, where any
directory named `<step>` counts as complete, even a torn copy. Leftover `*.orbax-checkpoint-tmp`
directories are ignored in both modes.)

Restore takes an abstract state (ShapeDtypeStructs carrying the target shardings), so a run
saved on one mesh resumes on another.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from nanochat_jax import model
from nanochat_jax.config import GPTConfig
from nanochat_jax.train_step import TrainState, train_state_shardings

COMMIT_MARKER = "commit_success.txt"  # Orbax's commit file (atomicity_types.COMMIT_SUCCESS_FILE)


def abstract_train_state(config: GPTConfig, tx, mesh, dtype=None) -> TrainState:
    """The restore target for `mesh`: shapes and dtypes of a fresh state, with that mesh's shardings."""
    shardings = train_state_shardings(config, tx, mesh, dtype)
    params = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0), dtype))
    shapes = TrainState(params, jax.eval_shape(tx.init, params))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def check_compatible(meta: dict, config: GPTConfig) -> None:
    """Raises ValueError naming every model_config field where the checkpoint differs from `config`."""
    if "model_config" not in meta:
        raise ValueError(f"checkpoint meta has no model_config (keys: {sorted(meta)})")
    saved, want = GPTConfig.from_dict(meta["model_config"]).to_dict(), config.to_dict()
    diffs = [f"{k}: checkpoint {saved[k]!r} != expected {want[k]!r}" for k in want if saved[k] != want[k]]
    if diffs:
        raise ValueError("checkpoint model_config does not match this model: " + "; ".join(diffs))


def _check_writable(directory: str) -> None:
    """Fail at construction, not at the first async save hours into a run. Root ignores
    permission bits, so this writes a probe file rather than trusting os.access."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise OSError(f"checkpoint directory {directory} is not writable: {e}") from e


class Checkpointer:
    """Async save / restore of (TrainState, data iterator, meta) under one directory.

    Every process must make the same calls (Orbax synchronizes hosts inside them).
    Remote paths (gs://...) go to Orbax untested here and skip the local writability probe.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True):
        directory = os.fspath(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
            _check_writable(directory)
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            atomicity_options=ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE))
        # cleanup_tmp_directories stays off: a reader opening a live run's directory must not
        # delete the save in flight. A leftover partial step is replaced when that step is saved again.
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        })

    def save(self, step: int, state: TrainState, data_iterator=None, meta: dict | None = None) -> None:
        """Starts writing step `step` and returns once the device arrays are copied to host memory
        and the iterator state is read; training may go on (and donate `state`) right away."""
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave({**(meta or {}), "step": int(step)})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(int(step), args=ocp.args.Composite(**items))

    def wait(self) -> None:
        """Blocks until every started save is committed."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        """Complete steps only, ascending. Orbax lists a save still in flight (and knows only the steps
        found at construction plus this process's own saves); the commit marker filters the former."""
        return sorted(s for s in self._manager.all_steps() if (self._step_dir(s) / COMMIT_MARKER).exists())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int | None = None) -> dict:
        """The meta of `step` (default: the latest complete one)."""
        step = self._complete_step(step)
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def restore(self, step: int | None = None, *, target: TrainState, data_iterator=None,
                config: GPTConfig | None = None) -> tuple[TrainState, dict]:
        """(state, meta) of `step` (default: the latest complete one), laid out like `target`.

        target: the state's ShapeDtypeStructs with the shardings wanted (abstract_train_state),
        which may belong to a different mesh than the one saved from. data_iterator, if given,
        is set in place to this process's saved position. config, if given, is checked against
        the checkpoint's model_config first (check_compatible).
        """
        step = self._complete_step(step)
        meta = self.read_meta(step)
        if config is not None:
            check_compatible(meta, config)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            self._check_data_saved(step)
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored.state, meta

    def restore_state_tree(self, step: int | None = None, device=None) -> tuple[dict, dict]:
        """(state as a plain dict tree, meta) of `step`, every array on one device whatever mesh
        saved it: for loaders that need the params (and maybe the optimizer state) but no
        TrainState template, e.g. serving, evaluation, or warm-starting SFT."""
        step = self._complete_step(step)
        meta = self.read_meta(step)
        here = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
        path = self._step_dir(step) / "state"
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)  # the item dir has no step-level metadata file: a harmless warning
        try:
            saved = ocp.StandardCheckpointer().metadata(path).item_metadata
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
            return ocp.StandardCheckpointer().restore(path, target), meta
        finally:
            absl_log.setLevel(level)

    def close(self) -> None:
        """Waits for pending saves, then releases Orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _complete_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None and steps:
            return steps[-1]
        if step in steps:
            return step
        what = "no complete checkpoint" if step is None else f"no complete checkpoint for step {step}"
        raise FileNotFoundError(f"{what} in {self.directory} (complete steps: {steps})")

    def _check_data_saved(self, step: int) -> None:
        """A clear error instead of Grain's bare missing-file one: no data item, or another process count."""
        data_dir = self._step_dir(step) / "data"
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not (data_dir / name).exists():
            saved = sorted(p.name for p in data_dir.glob("process_*.json")) if data_dir.exists() else []
            raise ValueError(f"step {step} in {self.directory} has no data iterator state for this process "
                             f"({name}); saved: {saved or 'none'}. Resuming the data stream needs the same "
                             f"process count as the run that saved it.")


def checkpoint_dir(path) -> epath.Path:
    """A run directory (base_train/sft/rl --out-dir) means its checkpoints/; anything else is itself."""
    path = epath.Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_params(directory, step: int | None = None) -> tuple[dict, GPTConfig, dict]:
    """(params, config, meta) of the latest (or given) complete step of a checkpoint or run directory."""
    with Checkpointer(checkpoint_dir(directory), async_save=False) as ckpt:
        state, meta = ckpt.restore_state_tree(step)
    return state["params"], GPTConfig.from_dict(meta["model_config"]), meta


def newest_run(root) -> epath.Path:
    """The most recently written run directory (one holding `checkpoints/`) under root, e.g.
    $NANOCHAT_JAX_HOME/base_checkpoints; FileNotFoundError naming root if there is none."""
    root = epath.Path(root)
    runs = [p for p in root.glob("*") if (p / "checkpoints").is_dir()] if root.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"no run with a checkpoints/ directory in {root}")
    return max(runs, key=lambda p: os.stat(p / "checkpoints").st_mtime)
