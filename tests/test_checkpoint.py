"""Checkpoints: bit-exact async round trip, retention, resharding onto another mesh, exact data
resume (per process), crash safety (a killed save is never restored), and clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import communicate_all
from xla_flags import cpu_devices_flags

from nanochat_jax import checkpoint as C
from nanochat_jax import optim, sharding, train_step
from nanochat_jax.config import GPTConfig
from nanochat_jax.data.pipeline import pretrain_loader

CFG = GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
BOS = 256
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encode(texts):
    return [[BOS] + list(t.encode()) for t in texts]


def tokens(seed):
    x = np.random.default_rng(seed).integers(0, CFG.vocab_size, (1, 8, CFG.sequence_len + 1), dtype=np.int32)
    return x[..., :-1], x[..., 1:]


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def run():
    """A state one step into training on data=8 (so the optimizer moments are non-zero) and its step fn."""
    tx = optim.make_optimizer(CFG, num_iterations=10)
    mesh = sharding.make_mesh("data=8")
    step = train_step.make_train_step(CFG, tx, mesh)
    state, _ = step(train_step.init_train_state(CFG, tx, mesh, jax.random.key(0)), *tokens(0))
    return tx, mesh, step, state


def copy(state):
    return jax.tree.map(lambda x: x.copy(), state)  # the train step donates its input


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards (2 train + val), 4 row groups of 6 docs each."""
    d = tmp_path_factory.mktemp("shards")
    for f in range(3):
        with pq.ParquetWriter(d / f"shard_{f:05d}.parquet", pa.schema([("text", pa.string())])) as w:
            for r in range(4):
                w.write_table(pa.table({"text": [f"f{f} r{r} d{i} " + "xy" * ((5 * f + 3 * r + 7 * i) % 19)
                                                 for i in range(6)]}))
    return d


def loader(shards, p=0, n=1):
    return iter(pretrain_loader(shards, encode, BOS, batch_size=2, seq_len=16, process_index=p, process_count=n,
                                buffer_size=8))


def take(it, k):
    return [next(it) for _ in range(k)]


# ---- state ---------------------------------------------------------------------------------------

def test_async_round_trip_is_bit_exact(run, tmp_path):
    tx, mesh, _, state = run
    meta = {"model_config": CFG.to_dict(), "user_config": {"depth": 2}, "loop_state": {"min_val_bpb": 1.5}}
    with C.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(7, state, meta=meta)  # returns before the write commits
        ckpt.wait()
        assert ckpt.all_steps() == [7] and ckpt.latest_step() == 7
        assert (tmp_path / "ckpt" / "7" / C.COMMIT_MARKER).exists()
        target = train_step.abstract_train_state(CFG, tx, mesh)
        restored, got_meta = ckpt.restore(target=target, config=CFG)
    assert isinstance(restored, train_step.TrainState)
    assert_trees_equal(restored, state)
    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert r.sharding == t.sharding
    assert got_meta == {**meta, "step": 7}
    assert ckpt.read_meta(7)["loop_state"] == {"min_val_bpb": 1.5}


def test_max_to_keep(tmp_path):
    state = {"w": np.arange(4.0)}
    with C.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for s in (10, 20, 30, 40):
            ckpt.save(s, state, meta={"i": s})
        ckpt.wait()
        assert ckpt.all_steps() == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["30", "40"]


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_restore_onto_another_mesh(run, tmp_path):
    """Saved on data=8, restored on data=2,model=4: same values, new shardings, same next-step loss."""
    tx, _, step8, state = run
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, meta={"model_config": CFG.to_dict()})
        ckpt.wait()
        mesh24 = sharding.make_mesh("data=2,model=4")
        target = train_step.abstract_train_state(CFG, tx, mesh24)
        restored, _ = ckpt.restore(target=target)
    assert_trees_equal(restored, state)
    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert r.sharding == t.sharding and r.sharding.mesh.shape["model"] == 4
    step24 = train_step.make_train_step(CFG, tx, mesh24)
    _, m8 = step8(copy(state), *tokens(1))
    _, m24 = step24(restored, *tokens(1))
    np.testing.assert_allclose(float(m24["loss"]), float(m8["loss"]), rtol=1e-6)


# ---- data iterator -------------------------------------------------------------------------------

def test_data_iterator_resumes_exactly(shards, tmp_path):
    it = loader(shards)
    take(it, 3)
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, {"w": np.zeros(2)}, data_iterator=it)
        want = take(it, 5)  # advancing right away: the saved position is the one at save()
        ckpt.wait()
        assert [p.name for p in (tmp_path / "3" / "data").glob("process_*")] == ["process_0-of-1.json"]
        resumed = loader(shards)
        ckpt.restore(target={"w": jax.ShapeDtypeStruct((2,), np.float64)}, data_iterator=resumed)
        got = take(resumed, 5)
    it.close()
    resumed.close()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])


def test_data_restore_needs_same_process_count(shards, tmp_path):
    it = loader(shards)
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": np.zeros(2)}, data_iterator=it)
        ckpt.save(2, {"w": np.zeros(2)})
        ckpt.wait()
        os.rename(tmp_path / "1" / "data" / "process_0-of-1.json", tmp_path / "1" / "data" / "process_0-of-2.json")
        target = {"w": jax.ShapeDtypeStruct((2,), np.float64)}
        with pytest.raises(ValueError, match=r"process_0-of-1\.json.*process_0-of-2\.json.*same process count"):
            ckpt.restore(1, target=target, data_iterator=it)
        with pytest.raises(ValueError, match="none"):
            ckpt.restore(2, target=target, data_iterator=it)
    it.close()


_TWO_PROCESS_WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]))
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pathlib import Path
    from nanochat_jax import checkpoint as C, sharding
    from test_checkpoint import loader, take
    sh = NamedSharding(sharding.make_mesh("data=4"), P("data"))
    w = jax.make_array_from_callback((8,), sh, lambda i: np.arange(8.0)[i])
    it = loader(Path({shards!r}), jax.process_index(), 2)  # this process's stream: row groups p, p+2, ...
    take(it, 2)
    ckpt = C.Checkpointer({ckpt!r})
    ckpt.save(2, {{"w": w}}, data_iterator=it, meta={{"by": jax.process_index()}})
    want = take(it, 3)
    ckpt.wait()
    resumed = loader(Path({shards!r}), jax.process_index(), 2)
    state, meta = ckpt.restore(target={{"w": jax.ShapeDtypeStruct((8,), w.dtype, sharding=sh)}}, data_iterator=resumed)
    got = take(resumed, 3)
    ckpt.close(); it.close(); resumed.close()
    print(json.dumps({{"same": all((a["inputs"] == b["inputs"]).all() for a, b in zip(got, want)),
                       "first": want[0]["inputs"].tolist(), "meta": meta,
                       "w": [np.asarray(s.data).tolist() for s in state["w"].addressable_shards]}}))
""")


def test_two_processes_each_resume_their_own_stream(shards, tmp_path):
    """Two JAX processes (2 CPU devices each) share one checkpoint: each restores its own iterator."""
    import portpicker

    script = tmp_path / "worker.py"
    script.write_text(_TWO_PROCESS_WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                                 port=portpicker.pick_unused_port(), shards=str(shards),
                                                 ckpt=str(tmp_path / "ckpt")))
    env = {**os.environ, "XLA_FLAGS": cpu_devices_flags(2), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    outs = communicate_all(procs, timeout=120)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    res = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(r["same"] for r in res)
    assert res[0]["first"] != res[1]["first"], "the two processes read different row groups"
    assert res[0]["meta"] == res[1]["meta"] == {"by": 0, "step": 2}, "only process 0 writes meta"
    assert [r["w"] for r in res] == [[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]]
    names = sorted(p.name for p in (tmp_path / "ckpt" / "2" / "data").glob("process_*"))
    assert names == ["process_0-of-2.json", "process_1-of-2.json"]


# ---- crash safety --------------------------------------------------------------------------------

_KILLED_SAVE_WORKER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from orbax.checkpoint._src.path import atomicity
    from nanochat_jax import checkpoint as C

    ckpt = C.Checkpointer({ckpt!r})
    ckpt.save(1, {{"w": np.full(1000, 1.0)}}, meta={{"v": 1}})
    ckpt.wait()
    commit = atomicity.CommitFileTemporaryPath.finalize

    async def die_before_step_commit(self):
        if self.get().name == "2":  # every item and host is written; only the step's commit is left
            os.kill(os.getpid(), signal.SIGKILL)
        await commit(self)

    atomicity.CommitFileTemporaryPath.finalize = die_before_step_commit
    ckpt.save(2, {{"w": np.full(1000, 2.0)}}, meta={{"v": 2}})
    ckpt.wait()
""")


def test_save_killed_before_commit_is_ignored(tmp_path):
    """A real process killed at the worst moment (all data written, commit marker not yet)."""
    script = tmp_path / "worker.py"
    script.write_text(_KILLED_SAVE_WORKER.format(root=ROOT, ckpt=str(tmp_path / "ckpt")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    step2 = tmp_path / "ckpt" / "2"
    assert (step2 / "state").is_dir() and not (step2 / C.COMMIT_MARKER).exists()
    target = {"w": jax.ShapeDtypeStruct((1000,), np.float64)}
    with C.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        state, meta = ckpt.restore(target=target)
        assert meta == {"v": 1, "step": 1} and float(state["w"][0]) == 1.0
        with pytest.raises(FileNotFoundError, match="step 2"):
            ckpt.restore(2, target=target)
        ckpt.save(2, {"w": np.full(1000, 3.0)}, meta={"v": 3})  # the torn step is replaced
        ckpt.wait()
        state, meta = ckpt.restore(target=target)
        assert meta["v"] == 3 and float(state["w"][0]) == 3.0


@pytest.mark.parametrize("layout", ["torn_step_dir", "rename_tmp_dir"])
def test_incomplete_step_dirs_are_ignored(tmp_path, layout):
    """Made by hand: a step dir without the commit marker (a killed commit-file save, or a torn copy
    / non-atomic rename), and a `<step>.orbax-checkpoint-tmp` dir (a killed rename-mode save)."""
    target = {"w": jax.ShapeDtypeStruct((3,), np.float64)}
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, {"w": np.full(3, 5.0)}, meta={"v": 5})
        ckpt.wait()
    name = "9" if layout == "torn_step_dir" else "9.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "5", tmp_path / name)
    (tmp_path / name / C.COMMIT_MARKER).unlink()
    with C.Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [5] and ckpt.latest_step() == 5
        state, meta = ckpt.restore(target=target)
    assert meta["step"] == 5 and float(state["w"][0]) == 5.0


# ---- errors --------------------------------------------------------------------------------------

def test_no_checkpoint_names_the_directory(tmp_path):
    with C.Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match=f"no complete checkpoint in {tmp_path / 'empty'}"):
            ckpt.restore(target={})


def test_config_mismatch_lists_the_fields(tmp_path):
    other = GPTConfig(sequence_len=64, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": np.zeros(2)}, meta={"model_config": other.to_dict()})
        ckpt.wait()
        with pytest.raises(ValueError) as e:
            ckpt.restore(target={"w": jax.ShapeDtypeStruct((2,), np.float64)}, config=CFG)
    msg = str(e.value)
    assert "vocab_size: checkpoint 256 != expected 128" in msg and "n_layer: checkpoint 3 != expected 2" in msg
    assert "n_embd" not in msg
    C.check_compatible({"model_config": CFG.to_dict()}, CFG)
    with pytest.raises(ValueError, match="no model_config"):
        C.check_compatible({"step": 1}, CFG)


def test_unwritable_directory_fails_at_construction(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError, match="not writable"):
        C.Checkpointer(tmp_path / "file" / "ckpt")
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OSError, match="not writable"):
            C.Checkpointer(ro)


# ---- integrity: checksums, fallback, retention, read-only readers, disk full ---------------------

def _biggest_data_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_byte(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def _two_steps(directory, n=50_000):
    rng = np.random.default_rng(0)
    states = {s: {"w": jax.numpy.asarray(rng.standard_normal(n).astype(np.float32)), "n": np.int32(s)} for s in (1, 2)}
    with C.Checkpointer(directory) as ckpt:
        for s, st in states.items():
            ckpt.save(s, st, meta={"v": s})
    return states, {"w": jax.ShapeDtypeStruct((n,), np.float32), "n": jax.ShapeDtypeStruct((), np.int32)}


def test_flipped_byte_is_detected_and_restore_falls_back(tmp_path):
    states, target = _two_steps(tmp_path)
    _flip_byte(_biggest_data_file(tmp_path / "2"))
    said = []
    with C.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(C.CheckpointCorruptError, match=r"step 2 .* is corrupt: 1 of 2 arrays fail their checksum \(w\)"):
            ckpt.restore(2, target=target)  # an explicit step never falls back
        state, meta = ckpt.restore(target=target, say=said.append)
        assert meta["step"] == 1 and ckpt.bad_steps.keys() == {2}
        np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(states[1]["w"]))
        assert len(said) == 1 and "step 2" in said[0] and "falling back to step 1" in said[0] and "\n" not in said[0]
        tree, meta = ckpt.restore_state_tree(say=said.append)  # the readers' path falls back the same way
        assert meta["step"] == 1
        moved = ckpt.set_aside(2)  # a resumed run moves the bad step away and can save step 2 again
        assert moved.name.startswith("2.corrupt-") and ckpt.all_steps() == [1]
        ckpt.save(2, states[2], meta={"v": 22})
        ckpt.wait()
        state, meta = ckpt.restore(target=target)
        assert meta == {"v": 22, "step": 2}
    params_dir = tmp_path  # load_params: same verdict through the reader entry point
    _flip_byte(_biggest_data_file(params_dir / "1"))
    _flip_byte(_biggest_data_file(params_dir / "2"))
    with pytest.raises(C.CheckpointCorruptError, match=r"no intact checkpoint .* steps \[1, 2\]"):
        with C.Checkpointer(params_dir, read_only=True) as ckpt:
            ckpt.restore(target=target, say=said.append)


def test_a_changed_digit_in_the_meta_is_caught(tmp_path):
    _, target = _two_steps(tmp_path)
    meta_file = tmp_path / "2" / "meta" / "metadata"
    meta_file.write_text(meta_file.read_text().replace('"v": 2', '"v": 3'))  # still valid JSON
    with C.Checkpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(C.CheckpointCorruptError, match=r"step 2 .* is corrupt: its meta fails its checksum"):
            ckpt.read_meta(2)
        assert ckpt.restore(target=target, say=lambda m: None)[1] == {"v": 1, "step": 1}


def test_truncated_array_file_is_unreadable_not_a_traceback(tmp_path):
    _, target = _two_steps(tmp_path)
    f = _biggest_data_file(tmp_path / "2")
    f.write_bytes(f.read_bytes()[:100])
    with C.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(C.CheckpointCorruptError, match=r"step 2 .* (unreadable|corrupt)") as e:
            ckpt.restore(2, target=target)
        assert "\n" not in str(e.value)
        assert ckpt.restore(target=target, say=lambda m: None)[1]["step"] == 1


def test_wrong_tree_is_a_mismatch_not_corruption(tmp_path):
    _, target = _two_steps(tmp_path)
    with C.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(C.CheckpointMismatchError, match=r"another state tree \(missing: x; shape: w \(50000,\) != \(3,\)"):
            ckpt.restore(target={**target, "w": jax.ShapeDtypeStruct((3,), np.float32),
                                 "x": jax.ShapeDtypeStruct((), np.float32)})


def test_checksums_cover_every_array_and_cost_little(run):
    _, _, _, state = run
    sums = C.array_checksums(state)
    assert len(sums) == len(jax.tree.leaves(state))
    again = C.array_checksums(copy(state))
    assert sums == again
    one = jax.tree.map(lambda x: x, state)
    w = one.params["wte"]
    changed = w.at[3, 5].set(jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(w[3, 5], np.uint32) ^ 1,
                                                          w.dtype))
    one.params["wte"] = changed
    diff = [k for k, v in C.array_checksums(one).items() if v != sums[k]]
    assert diff == ["params/wte"]
    # the same bytes give the same digest as numpy arrays and as sharded jax arrays
    assert C.array_checksums({"a": np.asarray(w)}) == {"a": sums["params/wte"]}


def test_retention_never_drops_the_last_checkpoint_and_no_save_is_skipped(tmp_path):
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_to_keep must be >= 1"):
            C.Checkpointer(tmp_path, max_to_keep=bad)
    with C.Checkpointer(tmp_path, max_to_keep=1) as ckpt:
        ckpt.save(5, {"w": np.zeros(2)})
        ckpt.wait()
        with pytest.raises(C.CheckpointSaveError, match="not saving step 3: .* already has step 5"):
            ckpt.save(3, {"w": np.ones(2)})  # Orbax alone would skip this without a word
        ckpt.save(6, {"w": np.ones(2)})
        ckpt.wait()
        assert ckpt.all_steps() == [6]


def test_readers_never_write(tmp_path):
    typo = tmp_path / "no_such_run"
    with pytest.raises(C.CheckpointNotFoundError, match="no checkpoint directory"):
        C.load_params(typo)
    assert not typo.exists()
    _two_steps(tmp_path / "ck")
    before = sorted(str(p) for p in (tmp_path / "ck").rglob("*"))
    os.chmod(tmp_path / "ck", 0o555)
    try:
        with C.Checkpointer(tmp_path / "ck", read_only=True) as ckpt:
            assert ckpt.all_steps() == [1, 2]
            tree, meta = ckpt.restore_state_tree()
            assert meta["step"] == 2
            with pytest.raises(C.CheckpointSaveError, match="read-only"):
                ckpt.save(3, {"w": np.zeros(2)})
    finally:
        os.chmod(tmp_path / "ck", 0o755)
    assert sorted(str(p) for p in (tmp_path / "ck").rglob("*")) == before


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_disk_full_is_one_line_and_keeps_the_previous_step(tiny_disk, monkeypatch):
    rng = np.random.default_rng(0)
    big = lambda: {"w": jax.numpy.asarray(rng.standard_normal(200_000).astype(np.float32))}  # 800 KB  # noqa: E731
    with C.Checkpointer(tiny_disk / "ck", max_to_keep=5) as ckpt:
        ckpt.save(1, big())
        ckpt.wait()
        ckpt.save(2, big())
        ckpt.wait()
        with pytest.raises(C.CheckpointSaveError, match=r"disk full: checkpoint step 3 needs about 0.8 MB but "
                                                         r".* free; the previous checkpoint \(step 2\) is intact"):
            ckpt.save(3, big())  # refused up front: the free space is below the state's size
        monkeypatch.setattr(C, "free_bytes", lambda path: 1 << 40)  # as if another writer filled it after the check
        ckpt.save(3, big())
        with pytest.raises(C.CheckpointSaveError) as e:
            ckpt.wait()
    msg = str(e.value)
    assert msg.startswith(f"disk full: saving checkpoint {tiny_disk / 'ck' / '3'} failed with")
    assert "previous checkpoint (step 2) is intact" in msg and "\n" not in msg
    monkeypatch.undo()
    with C.Checkpointer(tiny_disk / "ck", read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.restore_state_tree()[1]["step"] == 2
