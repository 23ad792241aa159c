"""Training checkpoints on Orbax: train state + each host's data-iterator state + JSON meta, saved async.

One step directory holds three items:

- `state`: the TrainState (params + optimizer state), every host writing its own shards;
- `data`:  each process's Grain iterator state, `process_{i}-of-{n}.json` (Grain's own
  Orbax handler), so every host resumes its own stream; optional;
- `meta`:  JSON written by process 0 only: {"step", "model_config", "user_config",
  "loop_state", ...} like nanochat's meta_{step}.json;
- `checksums`: JSON {"arrays": {array path: digest}, "meta": digest of the meta} (ChecksumHandler), process 0.

Completion: the commit-file protocol on every filesystem. A step directory counts only
once `commit_success.txt` is in it, and Orbax writes that last, after every item and host
has finished. A save killed midway therefore leaves a step directory without the marker,
which is never listed or restored, and which the next save of that step replaces. (Orbax's
default on local disks is rename-from-`<step>.orbax-checkpoint-tmp` instead, where any
directory named `<step>` counts as complete, even a torn copy. Leftover `*.orbax-checkpoint-tmp`
directories are ignored in both modes.)

Integrity: the commit marker says a save finished, not that its bytes are still right (Orbax's
zstd chunks carry no checksum: one flipped byte restores as a wrong number). Each save records
a checksum of every array as the step's `checksums` item: the device computes the digests while
Orbax writes, and the item, like every item, is complete before the marker. Every restore
recomputes them on the restored arrays. A step that fails that, or cannot be read at
all, raises CheckpointCorruptError; asked for "the latest", restore says which step is bad
and falls back to the newest intact one.

Restore takes an abstract state (ShapeDtypeStructs carrying the target shardings), so a run
saved on one mesh resumes on another.

Every error a user can act on is a CheckpointError whose message is one line.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nanochat_jax.config import GPTConfig
from nanochat_jax.train_step import TrainState

COMMIT_MARKER = "commit_success.txt"  # Orbax's commit file (atomicity_types.COMMIT_SUCCESS_FILE)
CHECKSUMS = "checksums"  # the step item holding {array path: "dtype:hex digest"}


class CheckpointError(Exception):
    """A checkpoint problem the user can act on; the message is one line naming the directory."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint where one was asked for."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """An intact checkpoint that is not what the caller expects (model config, state tree, process count)."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """A committed step whose arrays fail their checksum or cannot be read."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class CheckpointSaveError(CheckpointError, OSError):
    """A save that cannot start or did not finish (disk full, step already saved, ...)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


# ---- array checksums -----------------------------------------------------------------------------
# Per array: (Σ w, Σ w·(2i+1)) mod 2^32 over its elements' bits as uint32 words w, i the flat
# index. Any change inside one word changes the first sum (the change is non-zero and below 2^32);
# the odd weights make moved words change the second. It is a reduction, so it runs on the device
# where the array lives, on whatever mesh, and gives the same value for any sharding.

def _words_jnp(x):
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    n = x.dtype.itemsize
    wide = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}
    w = jax.lax.bitcast_convert_type(x, wide.get(n, jnp.uint32))
    return w.astype(jnp.uint32)


def _digest_jnp(x):
    """Σ i·w_i is taken through the per-axis marginal sums (Σ_d stride_d Σ_k k·m_d[k]): no index array the
    size of x, so it costs about what a plain sum does."""
    w = _words_jnp(x)
    total = w.sum(dtype=jnp.uint32)
    weighted, stride = jnp.uint32(0), 1
    for d in reversed(range(w.ndim)):
        others = tuple(a for a in range(w.ndim) if a != d)
        m = w.sum(axis=others, dtype=jnp.uint32) if others else w
        k = jnp.arange(w.shape[d], dtype=jnp.uint32)
        weighted = weighted + jnp.uint32(stride % 2**32) * (m * k).sum(dtype=jnp.uint32)
        stride *= w.shape[d]
    return jnp.stack([total, 2 * weighted + total])  # Σ w·(2i+1)


@functools.cache
def _digest_fn():
    return jax.jit(lambda leaves: [_digest_jnp(x) for x in leaves])


def _digest_np(a) -> tuple[int, int]:
    a = np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        a = a.view(np.uint8)
    wide = {4: np.uint32, 2: np.uint16, 1: np.uint8}
    w = a.view(wide.get(a.dtype.itemsize, np.uint32)).astype(np.uint32).reshape(-1)
    i = np.arange(w.size, dtype=np.uint32)
    return int(w.sum(dtype=np.uint32)), int((w * (2 * i + 1)).sum(dtype=np.uint32))


def _path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _start_digests(tree) -> list:
    """[(path, dtype name, digest)] with jax arrays' digests still being computed on their devices."""
    named = [(_path_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
    dev = [(k, x) for k, x in named if isinstance(x, jax.Array) and not jnp.issubdtype(x.dtype, jax.dtypes.extended)]
    out = [(k, x.dtype.name, d) for (k, x), d in zip(dev, _digest_fn()([x for _, x in dev]) if dev else [])]
    out += [(k, np.dtype(x.dtype).name, _digest_np(x)) for k, x in named if isinstance(x, (np.ndarray, np.generic))]
    return out


def _finish_digests(started: list) -> dict[str, str]:
    out = {}
    for k, dtype, d in started:
        if isinstance(d, jax.Array):
            d = np.asarray(d if d.is_fully_addressable else d.addressable_data(0))  # replicated: every host has it
        s, ws = (int(v) for v in d)
        out[k] = f"{dtype}:{s:08x}{ws:08x}"
    return out


def meta_checksum(meta: dict) -> str:
    """A digest of the meta as JSON (key order aside): a changed digit in the loop state is caught too."""
    return "sha256:" + hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]


def array_checksums(tree) -> dict[str, str]:
    """{array path: "dtype:16 hex digits"} for every jax/numpy array in `tree` (other leaves are skipped)."""
    return _finish_digests(_start_digests(tree))


class ChecksumHandler(ocp.AsyncCheckpointHandler):
    """The `checksums` item. Saving takes digests the devices are still computing and writes them in
    Orbax's background commit, so save() returns without waiting for them; process 0 writes."""

    FILENAME = "checksums.json"

    async def async_save(self, directory: epath.Path, args: ChecksumSave):
        async def write():
            self.save(directory, args)
        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="checksums_save")]

    def save(self, directory: epath.Path, args: ChecksumSave):
        record = {"arrays": _finish_digests(args.started), "meta": args.meta}  # waits for the devices' digests
        if jax.process_index() == 0:
            (directory / self.FILENAME).write_text(json.dumps(record))

    def restore(self, directory: epath.Path, args: ChecksumRestore | None = None) -> dict:
        return json.loads((directory / self.FILENAME).read_text())

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(ChecksumHandler, for_save=True)
@dataclasses.dataclass
class ChecksumSave(ocp.args.CheckpointArgs):
    started: list  # _start_digests(state)
    meta: str | None = None  # meta_checksum(the meta item)


@ocp.args.register_with_handler(ChecksumHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumRestore(ocp.args.CheckpointArgs):
    pass


def _tree_nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "shape") and hasattr(x, "dtype") and not jnp.issubdtype(x.dtype, jax.dtypes.extended))


# ---- helpers -------------------------------------------------------------------------------------

def check_compatible(meta: dict, config: GPTConfig) -> None:
    """Raises CheckpointMismatchError (a ValueError) naming every model_config field where the
    checkpoint differs from `config`."""
    if "model_config" not in meta:
        raise CheckpointMismatchError(f"checkpoint meta has no model_config (keys: {sorted(meta)})")
    saved, want = GPTConfig.from_dict(meta["model_config"]).to_dict(), config.to_dict()
    diffs = [f"{k}: checkpoint {saved[k]!r} != expected {want[k]!r}" for k in want if saved[k] != want[k]]
    if diffs:
        raise CheckpointMismatchError("checkpoint model_config does not match this model: " + "; ".join(diffs))


def check_writable(directory, what: str = "checkpoint directory", keep: bool = True) -> None:
    """Fail at construction, not at the first async save hours into a run. Root ignores
    permission bits, so this writes a probe file rather than trusting os.access. keep=False: a
    directory made for the probe is removed again (the run creates it), so a later failure
    leaves nothing behind."""
    made = not os.path.exists(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise CheckpointSaveError(f"cannot write the {what} {directory}: it is not writable ({e.strerror or e})") from e
    finally:
        if made and not keep and os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)


def free_bytes(path) -> int | None:
    """Free space on the filesystem holding `path` (its nearest existing parent); None if unknown."""
    p = os.path.abspath(os.fspath(path))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:,.1f} MB"


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs each failure of its background save threads with a traceback (dozens for one full
    disk). The Checkpointer raises every such failure itself as one line, so those records go."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


_QUIET = _QuietOrbaxErrors()


def _is_disk_full(e: BaseException) -> bool:
    text = str(e)
    return getattr(e, "errno", None) == 28 or "No space left on device" in text or "os_error_code='28'" in text


class Checkpointer:
    """Async save / restore of (TrainState, data iterator, meta) under one directory.

    Every process must make the same calls (Orbax synchronizes hosts inside them).
    read_only=True is for readers (evaluation, serving, warm starts): nothing is created, probed
    or cleaned in the directory, and a missing directory is a CheckpointNotFoundError.
    Remote paths (gs://...) go to Orbax untested here and skip the local writability probe.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 (the newest checkpoint is always kept), got {max_to_keep}")
        directory = os.fspath(directory)
        local = "://" not in directory
        if local:
            directory = os.path.abspath(directory)
            if read_only and not os.path.isdir(directory):
                raise CheckpointNotFoundError(f"no checkpoint directory {directory}")
            if not read_only:
                check_writable(directory)
        self.directory = epath.Path(directory)
        self.read_only = read_only
        self._local = local
        self._in_flight: int | None = None  # the step of the save started last and not yet seen committed
        self.bad_steps: dict[int, str] = {}  # step -> why, for steps a restore found corrupt
        logging.getLogger("absl").addFilter(_QUIET)
        # cleanup_tmp_directories stays off: a reader opening a live run's directory must not
        # delete the save in flight. A leftover partial step is replaced when that step is saved again.
        # Orbax warns that a read-only manager saves nothing, which is what read-only asks for.
        with _absl_level(logging.ERROR if read_only else logging.NOTSET):
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else max_to_keep, enable_async_checkpointing=async_save,
                read_only=read_only, create=not read_only,
                atomicity_options=ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE))
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
                CHECKSUMS: ChecksumHandler(),
            })

    # ---- save --------------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, data_iterator=None, meta: dict | None = None) -> None:
        """Starts writing step `step` and returns once the device arrays are copied to host memory
        and the iterator state is read; training may go on (and donate `state`) right away.

        Raises CheckpointSaveError when the previous save failed (e.g. disk full), when the free
        space is below the state's size, or when the step is not newer than the latest one saved
        (Orbax would skip it without a word)."""
        step = int(step)
        if self.read_only:
            raise CheckpointSaveError(f"{self.directory} was opened read-only; not saving step {step}")
        self._raise_pending()
        need, free = _tree_nbytes(state), free_bytes(self.directory) if self._local else None
        if free is not None and need > free:
            raise CheckpointSaveError(
                f"disk full: checkpoint step {step} needs about {_mb(need)} but {self.directory} has {_mb(free)} "
                f"free; {self._previous_note()}")
        latest = self._manager.latest_step()
        if latest is not None and latest >= step:
            raise CheckpointSaveError(f"not saving step {step}: {self.directory} already has step {latest}; "
                                      "a directory holds one run (see --resume / --overwrite)")
        meta = {**(meta or {}), "step": step}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta),
                 CHECKSUMS: ChecksumSave(_start_digests(state), meta_checksum(meta))}  # before `state` may be donated
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise self._save_error(step, e) from None
        if not saved:
            raise CheckpointSaveError(f"Orbax skipped saving step {step} in {self.directory}")
        self._in_flight = step

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until every started save is committed (True), or `timeout` seconds pass (False).
        A failed save raises CheckpointSaveError."""
        if timeout is None:
            self._raise_pending()
            return True
        box: list = []

        def run():
            try:
                self._raise_pending()
                box.append(None)
            except BaseException as e:  # handed to the caller's thread
                box.append(e)

        t = threading.Thread(target=run, name="checkpoint-wait", daemon=True)
        t.start()
        t.join(timeout)
        if not box:
            return False
        if box[0] is not None:
            raise box[0]
        return True

    def _raise_pending(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            step, self._in_flight = self._in_flight, None
            raise self._save_error(step, e) from None
        self._in_flight = None

    def _previous_note(self) -> str:
        steps = self.all_steps()
        return f"the previous checkpoint (step {steps[-1]}) is intact" if steps else "no earlier checkpoint exists"

    def _save_error(self, step: int | None, e: Exception) -> CheckpointSaveError:
        where = self.directory / str(step) if step is not None else self.directory
        if _is_disk_full(e):
            return CheckpointSaveError(f"disk full: saving checkpoint {where} failed with {_mb(free_bytes(self.directory))} "
                                       f"free; {self._previous_note()}")
        return CheckpointSaveError(f"saving checkpoint {where} failed: {_first_line(e)}; {self._previous_note()}")

    # ---- listing -----------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Complete steps only, ascending. Orbax lists a save still in flight (and knows only the steps
        found at construction plus this process's own saves); the commit marker filters the former."""
        return sorted(s for s in self._manager.all_steps() if (self._step_dir(s) / COMMIT_MARKER).exists())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def set_aside(self, step: int, why: str = "corrupt") -> epath.Path:
        """Renames step `step` to `<step>.<why>-<UTC time>` (kept for inspection, never listed again), so
        a resumed run can save that step anew; returns the new path."""
        if self.read_only:
            raise CheckpointSaveError(f"{self.directory} was opened read-only; not moving step {step}")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        dest = self.directory / f"{step}.{why}-{stamp}"
        if jax.process_index() == 0:
            self._step_dir(step).rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"nanochat_jax set_aside {step}")
        self._manager.reload()
        return dest

    # ---- restore -----------------------------------------------------------------------------

    def read_meta(self, step: int | None = None) -> dict:
        """The meta of `step` (default: the latest complete one)."""
        step = self._complete_step(step)
        try:
            meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as e:
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} has unreadable meta: "
                                         f"{_first_line(e)}", step) from None
        recorded = (self._recorded_checksums(step) or {}).get("meta")
        if recorded and recorded != meta_checksum(meta):
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is corrupt: its meta fails "
                                         "its checksum", step)
        return meta

    def restore(self, step: int | None = None, *, target: TrainState, data_iterator=None,
                config: GPTConfig | None = None, fallback: bool | None = None, say=None) -> tuple[TrainState, dict]:
        """(state, meta) of `step` (default: the latest complete one), laid out like `target`.

        target: the state's ShapeDtypeStructs with the shardings wanted (train_step.abstract_train_state),
        which may belong to a different mesh than the one saved from. data_iterator, if given,
        is set in place to this process's saved position. config, if given, is checked against
        the checkpoint's model_config first (check_compatible). Every array is checked against
        its recorded checksum. fallback (default: when no step is given): a corrupt step is
        reported through say(str) and the next older one tried; meta["step"] is the step used.
        """
        def one(s):
            def prepare():
                meta = self.read_meta(s)
                if config is not None:
                    check_compatible(meta, config)
                self._check_tree(s, target)
                if data_iterator is not None:
                    self._check_data_saved(s)
                return meta, self._recorded_checksums(s)
            meta, recorded = self._agreed(s, prepare)
            items = {"state": ocp.args.StandardRestore(target)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            restored = self._agreed(s, lambda: self._read(s, lambda: self._manager.restore(
                s, args=ocp.args.Composite(**items)).state))
            self._verify(s, restored, recorded)  # a global reduction: every process gets the same verdict
            return restored, meta
        return self._with_fallback(step, one, fallback, say)

    def restore_state_tree(self, step: int | None = None, device=None, *, fallback: bool | None = None,
                           say=None) -> tuple[dict, dict]:
        """(state as a plain dict tree, meta) of `step`, every array on one device whatever mesh
        saved it: for loaders that need the params (and maybe the optimizer state) but no
        TrainState template, e.g. serving, evaluation, or warm-starting SFT. Checked and
        falling back as restore()."""
        here = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])

        def one(s):
            def prepare():
                saved = self._saved_tree(s)
                return self.read_meta(s), saved, self._recorded_checksums(s)
            meta, saved, recorded = self._agreed(s, prepare)
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)

            def read():
                with _absl_level(logging.ERROR):  # the item dir has no step-level metadata file: a harmless warning
                    return ocp.StandardCheckpointer().restore(self._step_dir(s) / "state", target)
            tree = self._agreed(s, lambda: self._read(s, read))
            self._verify(s, tree, recorded)
            return tree, meta
        return self._with_fallback(step, one, fallback, say)

    def _with_fallback(self, step, restore_one, fallback, say):
        say = say or (lambda msg: print(msg, file=sys.stderr))
        fallback = step is None if fallback is None else fallback
        if not fallback:
            return restore_one(self._complete_step(step))
        candidates = [s for s in reversed(self.all_steps()) if step is None or s <= step]
        if not candidates:
            self._complete_step(step)  # raises the not-found error
        self.bad_steps = {}
        for i, s in enumerate(candidates):
            try:
                return restore_one(s)
            except CheckpointCorruptError as e:
                self.bad_steps[s] = str(e)
                nxt = f"falling back to step {candidates[i + 1]}" if i + 1 < len(candidates) else "no older step left"
                say(f"warning: {e}; {nxt}")
        raise CheckpointCorruptError(f"no intact checkpoint in {self.directory}: steps "
                                     f"{sorted(self.bad_steps)} are all corrupt or unreadable")

    def _saved_tree(self, step: int):
        """Orbax's metadata of the saved state tree (shapes, dtypes)."""
        try:
            with _absl_level(logging.ERROR):
                return ocp.StandardCheckpointer().metadata(self._step_dir(step) / "state").item_metadata
        except Exception as e:
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} has unreadable array "
                                         f"metadata: {_first_line(e)}", step) from None

    def _check_tree(self, step: int, target) -> None:
        """A clear mismatch error (not 'corrupt': the bytes are fine, the caller wants another tree)."""
        saved = {_path_name(p): m for p, m in jax.tree_util.tree_leaves_with_path(self._saved_tree(step))}
        want = {_path_name(p): t for p, t in jax.tree_util.tree_leaves_with_path(target)}
        missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
        shapes = [f"{k} {tuple(saved[k].shape)} != {tuple(want[k].shape)}" for k in sorted(set(want) & set(saved))
                  if hasattr(want[k], "shape") and tuple(saved[k].shape) != tuple(want[k].shape)]
        if missing or extra or shapes:
            parts = [f"{label}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
                     for label, v in (("missing", missing), ("unexpected", extra), ("shape", shapes)) if v]
            raise CheckpointMismatchError(f"checkpoint step {step} in {self.directory} holds another state tree "
                                          f"({'; '.join(parts)})")

    def _read(self, step: int, fn):
        """fn() with any failure to read the arrays reported as this step being unreadable."""
        try:
            return fn()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is unreadable: "
                                         f"{_first_line(e)}", step) from None

    def _agreed(self, step: int, fn):
        """fn(), with every process learning whether any process failed it: a step bad on one host
        must be skipped by all, or the others would wait in the next collective forever."""
        err, out = None, None
        try:
            out = fn()
        except CheckpointError as e:
            err = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            code = 0 if err is None else 2 if isinstance(err, CheckpointCorruptError) else 1
            codes = np.asarray(multihost_utils.process_allgather(np.int32(code)))
            if err is None and codes.max() > 0:
                cls = CheckpointCorruptError if (codes == 2).any() else CheckpointMismatchError
                err = cls(f"checkpoint step {step} in {self.directory} failed on another process")
                if cls is CheckpointCorruptError:
                    err.step = step
        if err is not None:
            raise err
        return out

    def _recorded_checksums(self, step: int) -> dict | None:
        """The checksums saved with `step` (None for steps saved before checksums existed)."""
        item = self._step_dir(step) / CHECKSUMS
        if not item.exists():
            return None
        try:
            return ChecksumHandler().restore(item)
        except Exception as e:
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} has unreadable checksums: "
                                         f"{_first_line(e)}", step) from None

    def _verify(self, step: int, tree, recorded: dict | None) -> None:
        """Compare the restored arrays with the checksums recorded at save. A leaf restored in
        another dtype than it was saved in is not comparable and is skipped."""
        recorded = (recorded or {}).get("arrays")
        if not recorded:
            return
        got = array_checksums(tree)
        bad = [k for k, v in got.items() if k in recorded and recorded[k].split(":")[0] == v.split(":")[0]
               and recorded[k] != v]
        if bad:
            raise CheckpointCorruptError(
                f"checkpoint step {step} in {self.directory} is corrupt: {len(bad)} of {len(recorded)} arrays "
                f"fail their checksum ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})", step)

    def close(self) -> None:
        """Waits for pending saves, then releases Orbax's threads."""
        try:
            self._raise_pending()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: do not replace that error with a pending save's
            try:
                self.close()
            except CheckpointError:
                pass

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _complete_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None and steps:
            return steps[-1]
        if step in steps:
            return step
        what = "no complete checkpoint" if step is None else f"no complete checkpoint for step {step}"
        raise CheckpointNotFoundError(f"{what} in {self.directory} (complete steps: {steps})")

    def _check_data_saved(self, step: int) -> None:
        """A clear error instead of Grain's bare missing-file one: no data item, or another process count."""
        data_dir = self._step_dir(step) / "data"
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not (data_dir / name).exists():
            saved = sorted(p.name for p in data_dir.glob("process_*.json")) if data_dir.exists() else []
            raise CheckpointMismatchError(
                f"step {step} in {self.directory} has no data iterator state for this process ({name}); saved: "
                f"{saved or 'none'}. Resuming the data stream needs the same process count as the run that saved it.")


class _absl_level:
    """Temporarily raise the absl logger's level."""

    def __init__(self, level: int):
        self.level, self.log = level, logging.getLogger("absl")

    def __enter__(self):
        self.saved = self.log.level
        self.log.setLevel(max(self.level, self.saved))

    def __exit__(self, *exc):
        self.log.setLevel(self.saved)


def checkpoint_dir(path) -> epath.Path:
    """A run directory (base_train/sft/rl --out-dir) means its checkpoints/; anything else is itself."""
    path = epath.Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_params(directory, step: int | None = None, say=None) -> tuple[dict, GPTConfig, dict]:
    """(params, config, meta) of the latest intact (or the given) complete step of a checkpoint or run
    directory, read-only. Raises CheckpointError (one line) when there is none."""
    with Checkpointer(checkpoint_dir(directory), async_save=False, read_only=True) as ckpt:
        state, meta = ckpt.restore_state_tree(step, say=say)
    if "model_config" not in meta:
        raise CheckpointMismatchError(f"checkpoint step {meta.get('step')} in {directory} has no model_config")
    return state["params"], GPTConfig.from_dict(meta["model_config"]), meta


def load_engine(checkpoint: str, nanochat: bool, tokenizer_dir: str, dtype=None, step: int | None = None,
                mesh=None, quantize: str | None = None):
    """An Engine over params from a nanochat .pt directory, or from our Orbax checkpoint / run dir
    (latest or given step); mesh (serving_mesh.serving_mesh) splits it over devices; quantize="int8":
    weight-only int8 matmul kernels (nanochat_jax/quantize.py), quantized before the
    mesh splits them."""
    from nanochat_jax.scheduler import Engine
    from nanochat_jax.tokenizer import Tokenizer

    if nanochat:
        from nanochat_jax.convert import load_nanochat_checkpoint
        params, config, _ = load_nanochat_checkpoint(checkpoint, step=step, dtype=dtype)
    else:
        params, config, _ = load_params(checkpoint, step)
    if quantize is not None:
        from nanochat_jax.quantize import nbytes, quantize_params
        before, params = nbytes(params), quantize_params(params, quantize)
        print(f"quantize {quantize}: params {before / 1e6:.1f} MB -> {nbytes(params) / 1e6:.1f} MB", file=sys.stderr)
    return Engine(params, config, Tokenizer.load(tokenizer_dir), dtype=dtype, mesh=mesh)


def newest_run(root) -> epath.Path:
    """The most recently written run directory (one holding `checkpoints/`) under root, e.g.
    $NANOCHAT_JAX_HOME/base_checkpoints; CheckpointNotFoundError naming root if there is none."""
    root = epath.Path(root)
    runs = [p for p in root.glob("*") if (p / "checkpoints").is_dir()] if root.is_dir() else []
    if not runs:
        raise CheckpointNotFoundError(f"no run with a checkpoints/ directory in {root}")
    return max(runs, key=lambda p: os.stat(p / "checkpoints").st_mtime)


# ---- run directories -----------------------------------------------------------------------------

class RunDirError(ValueError):
    """A run directory that would mix two runs, or a --resume with nothing to resume."""


def _run_contents(out_dir) -> str:
    ckpts = epath.Path(out_dir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    if steps:
        return f"checkpoints at steps {steps}"
    names = sorted(p.name for p in epath.Path(out_dir).iterdir())
    return f"{len(names)} entries: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"


def prepare_run_dir(out_dir, *, resume: bool, overwrite: bool) -> epath.Path | None:
    """One directory, one run. Without resume, an existing non-empty out_dir is refused (RunDirError)
    unless overwrite, which renames it to `<out_dir>.replaced-<UTC time>` (returned). With resume it
    must hold a complete checkpoint. Call before anything is written; only process 0 renames."""
    out_dir = epath.Path(os.path.abspath(os.fspath(out_dir)))
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    if resume:
        ckpts = out_dir / "checkpoints"
        if not any((p / COMMIT_MARKER).exists() for p in (ckpts.iterdir() if ckpts.is_dir() else []) if p.name.isdigit()):
            raise RunDirError(f"--resume but there is no complete checkpoint in {ckpts}")
        return None
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"--out-dir {out_dir} is a file, not a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None
    if not overwrite:
        raise RunDirError(f"{out_dir} already holds a run ({_run_contents(out_dir)}); continue it with --resume, "
                          "move it aside with --overwrite, or choose another --out-dir")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    dest = out_dir.parent / f"{out_dir.name}.replaced-{stamp}"
    if jax.process_index() == 0:
        out_dir.rename(dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("nanochat_jax prepare_run_dir")
    return dest
