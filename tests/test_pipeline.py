"""The Grain pipeline (docs/numerics.md#data): host striding, epochs, splits, exact resume, TFDS without TF."""

import importlib.util
import itertools
import json
import re
import sys

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax.data import pipeline as P

BOS = 256
ROW_GROUPS = {0: [5, 3, 7, 4, 6], 1: [4, 6, 2], 2: [3, 5, 5, 6], 3: [6, 4]}  # file → docs per row group; 3 = val


def encode(texts):
    """A byte-level stand-in for the tokenizer: BOS, then the utf-8 bytes."""
    return [[BOS, *t.encode()] for t in texts]


def text(f, r, i):
    return f"f{f}r{r}d{i} " + "ab" * ((7 * f + 5 * r + 3 * i) % 23)


def where(t):
    return tuple(map(int, re.match(r"f(\d+)r(\d+)d(\d+)", t).groups()))


def write_shards(d, files=ROW_GROUPS):
    d.mkdir(parents=True, exist_ok=True)
    for f, sizes in files.items():
        with pq.ParquetWriter(d / f"shard_{f:05d}.parquet", pa.schema([("text", pa.string())])) as w:
            for r, n in enumerate(sizes):
                w.write_table(pa.table({"text": [text(f, r, i) for i in range(n)]}))
    return d


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def train_texts(shards, p, n, repeat=False):
    return P.ParquetTextIterDataset(P.split_shards(P.list_shards(shards), "train"), p, n, repeat=repeat)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


ALL_TRAIN = [text(f, r, i) for f in (0, 1, 2) for r, n in enumerate(ROW_GROUPS[f]) for i in range(n)]


def test_hosts_stride_row_groups(shards):
    got = [list(train_texts(shards, p, 2)) for p in (0, 1)]
    for p in (0, 1):
        assert all(where(t)[1] % 2 == p for t in got[p]), "host p reads row groups p, p+2, ... of each file"
        assert got[p] == sorted(got[p], key=where), "files, row groups and docs stay in order"
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1], key=where) == ALL_TRAIN


def test_epochs_wrap_and_val_is_separate(shards):
    epoch = list(train_texts(shards, 1, 3))
    assert all(where(t)[0] != 3 for t in epoch), "the last shard is val, never train"
    it = iter(train_texts(shards, 1, 3, repeat=True))
    assert take(it, 2 * len(epoch) + 3) == epoch + epoch + epoch[:3]
    assert it.get_state()["epoch"] == 2
    val = P.ParquetTextIterDataset(P.split_shards(P.list_shards(shards), "val"), 0, 1, repeat=False)
    assert list(val) == [text(3, r, i) for r, n in enumerate(ROW_GROUPS[3]) for i in range(n)]


@pytest.mark.parametrize("k", [0, 1, 5, 11, 40])
def test_source_resume_is_exact(shards, k):
    ds = train_texts(shards, 0, 2, repeat=True)
    it = iter(ds)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 30)
    resumed = iter(ds)
    resumed.set_state(state)
    assert take(resumed, 30) == want


@pytest.mark.parametrize("k", [0, 3, 7, 12])
def test_encode_resume_mid_chunk(shards, k):
    ds = P.EncodeIterDataset(train_texts(shards, 0, 1), encode, chunk_size=5)
    it = iter(ds)
    take(it, k)
    state = it.get_state()
    want = take(it, 9)
    resumed = iter(ds)
    resumed.set_state(state)
    assert take(resumed, 9) == want == encode(ALL_TRAIN[k:k + 9])


def test_errors(shards, tmp_path):
    with pytest.raises(ValueError, match="process_index"):
        P.host_index(2, 2)
    with pytest.raises(ValueError, match="split"):
        P.split_shards(P.list_shards(shards), "test")
    one = write_shards(tmp_path / "one", {0: [3]})
    with pytest.raises(ValueError, match="at least 2 shards"):
        P.pretrain_loader(one, encode, BOS, 1, 8, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no row groups"):
        train_texts(shards, 5, 6, repeat=True)


def loader(shards, p=0, n=2, **kw):
    return P.pretrain_loader(shards, encode, BOS, 2, 24, process_index=p, process_count=n, buffer_size=8, **kw)


def test_batches_come_from_this_hosts_docs(shards):
    mine = [tuple(d) for d in encode(list(train_texts(shards, 1, 2)))]
    it = iter(loader(shards, p=1, prefetch=0))
    for batch in take(it, 10):
        assert batch["inputs"].shape == batch["targets"].shape == (2, 24)
        assert batch["inputs"].dtype == np.int32
        for row in np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1):
            assert row[0] == BOS
            for seg in np.split(row, np.flatnonzero(row == BOS)[1:]):
                assert tuple(seg.tolist()) in {d[:len(seg)] for d in mine}


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_loader_resume_is_exact(shards, k):
    """Through the prefetch thread, with a JSON round trip and a fresh dataset object."""
    it = iter(loader(shards))
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 4)
    it.close()
    resumed = iter(loader(shards))
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), want)
    resumed.close()


def test_loader_resume_through_orbax(shards, tmp_path):
    import orbax.checkpoint as ocp

    it = iter(loader(shards))
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"ds": grain.checkpoint.CheckpointHandler()}) as mngr:
        mngr.save(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = take(it, 3)
        resumed = iter(loader(shards))
        mngr.restore(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same_batches(take(resumed, 3), want)
    it.close()
    resumed.close()


def test_val_batches_fixed(shards):
    a = P.val_batches(shards, encode, BOS, 2, 16, 3, process_index=0, process_count=1, buffer_size=4)
    b = P.val_batches(shards, encode, BOS, 2, 16, 3, process_index=0, process_count=1, buffer_size=4)
    assert len(a) == 3
    assert_same_batches(a, b)
    with pytest.raises(ValueError, match="val split gives only"):
        P.val_batches(shards, encode, BOS, 2, 16, 10_000, process_index=0, process_count=1)


# ---------------------------------------------------------------------------- TFDS

@pytest.fixture(scope="module")
def tfds_build(tmp_path_factory):
    """Two parquet shards and a .txt shard; the last by name (the .txt) is val."""
    root = tmp_path_factory.mktemp("tfds")
    raw = write_shards(root / "raw", {0: ROW_GROUPS[0], 1: ROW_GROUPS[1]})
    (raw / "shard_00002.txt").write_text("first val doc\n\nsecond val doc\nthird\n", encoding="utf-8")
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds.disable_progress_bar()
    P.prepare_tfds(raw, root / "tfds")
    return raw, root / "tfds"


def test_tfds_builds_without_tensorflow(tfds_build):
    import tensorflow_datasets as tfds

    raw, built = tfds_build
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules
    train = tfds.data_source(P.TFDS_NAME, split="train", data_dir=built, download=False)
    val = tfds.data_source(P.TFDS_NAME, split="val", data_dir=built, download=False)
    want = [text(f, r, i) for f in (0, 1) for r, n in enumerate(ROW_GROUPS[f]) for i in range(n)]
    assert [ex["text"].decode() for ex in train] == want, "documents keep their shard order"
    assert [ex["text"].decode() for ex in val] == ["first val doc", "second val doc", "third"]
    hosts = [list(grain.MapDataset.source(train)[p::2].map(P._example_text)) for p in (0, 1)]
    assert not set(hosts[0]) & set(hosts[1])
    assert sorted(hosts[0] + hosts[1], key=where) == want


def test_tfds_loader_resume_is_exact(tfds_build):
    raw, built = tfds_build
    ds = P.tfds_loader(built, encode, BOS, 2, 24, process_index=1, process_count=2, buffer_size=8)
    it = iter(ds)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 3)
    it.close()
    resumed = iter(ds)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), want)
    resumed.close()


def test_tfds_missing_falls_back_to_parquet(shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises ImportError
    with pytest.warns(RuntimeWarning, match="FALLING BACK"):
        ds = P.tfds_loader(tmp_path, encode, BOS, 2, 24, shard_dir=shards, process_index=0, process_count=2,
                           buffer_size=8, prefetch=0)
    assert_same_batches(list(itertools.islice(ds, 3)), take(iter(loader(shards, prefetch=0)), 3))
