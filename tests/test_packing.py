"""Best-fit crop packing (docs/numerics.md#packing): output properties, a plain reference, exact resume."""

import itertools
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanochat_jax.data.packing import BestFitCropIterDataset

BOS = 0


def make_docs(lengths):
    """Docs [BOS, t, t+1, ...] with content tokens unique across all docs, so any token names its doc."""
    docs, nxt = [], 1
    for n in lengths:
        docs.append([BOS] + list(range(nxt, nxt + n - 1)))
        nxt += n - 1
    return docs


def source(docs, repeat=False):
    """Docs as a synchronous Grain stream (no reader threads: much faster for many tiny cases)."""
    ds = grain.MapDataset.source(docs)
    return (ds.repeat() if repeat else ds).to_iter_dataset(grain.ReadOptions(num_threads=0))


def pack_all(docs, B, T, **kw):
    """Every batch the packer makes from a finite stream."""
    return list(BestFitCropIterDataset(source(docs), B, T, BOS, **kw))


def reference_pack(docs, B, T, buffer_size, chunk_size):
    """Upstream's algorithm, written plainly with Python lists."""
    stream, buf, out = iter(docs), [], []

    def refill():
        while len(buf) < buffer_size:
            chunk = list(itertools.islice(stream, chunk_size))
            if not chunk:
                return
            buf.extend(chunk)

    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                refill()
                if not buf:
                    return out
                room = T + 1 - len(row)
                best = None
                for i, d in enumerate(buf):
                    if len(d) <= room and (best is None or len(d) > len(buf[best])):
                        best = i
                if best is None:
                    shortest = min(range(len(buf)), key=lambda i: len(buf[i]))
                    row += buf.pop(shortest)[:room]
                else:
                    row += buf.pop(best)
            rows.append(row)
        rows = np.array(rows, dtype=np.int32)
        out.append({"inputs": rows[:, :-1], "targets": rows[:, 1:]})


def check_trace(docs, batches, B, T, buffer_size, chunk_size):
    """Checks every placement against upstream's rule, replaying the buffer from the output alone."""
    owner = {tok: k for k, d in enumerate(docs) for tok in d[1:]}
    lens = [len(d) for d in docs]
    stream, buf = iter(range(len(docs))), []
    for batch in batches:
        x, y = batch["inputs"], batch["targets"]
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        for row in np.concatenate([x[:, :1], y], axis=1):
            assert row[0] == BOS
            segments = np.split(row, np.flatnonzero(row == BOS)[1:])
            pos = 0
            for s, seg in enumerate(segments):
                while len(buf) < buffer_size:
                    chunk = list(itertools.islice(stream, chunk_size))
                    if not chunk:
                        break
                    buf.extend(chunk)
                room = T + 1 - pos
                fit = [lens[i] for i in buf if lens[i] <= room]
                if len(seg) > 1:
                    k = owner[int(seg[1])]
                else:  # a bare BOS: a 1-token doc if any is buffered, else a crop to 1
                    k = next((i for i in buf if lens[i] == 1), min(buf, key=lens.__getitem__))
                assert k in buf, "a doc was used twice or before it could have been buffered"
                assert list(seg) == docs[k][:len(seg)], "kept tokens are a contiguous prefix of one doc"
                if len(seg) == lens[k]:  # whole: the largest that fits, first on ties
                    assert k == next(i for i in buf if lens[i] == max(fit))
                else:  # cropped: nothing fit, the shortest doc, and it ends the row
                    assert not fit and s == len(segments) - 1 and len(seg) == room
                    assert lens[k] == min(lens[i] for i in buf)
                    if len(seg) > 1:
                        assert k == min(buf, key=lens.__getitem__)
                buf.remove(k)
                pos += len(seg)
            assert pos == T + 1


@st.composite
def packing_cases(draw):
    T = draw(st.integers(1, 40))
    cap = T + 1
    length = draw(st.sampled_from([
        st.integers(1, 3),  # many tiny docs
        st.sampled_from([1, cap - 1 or 1, cap]),  # exactly fitting
        st.integers(cap + 1, 4 * cap),  # longer than a row
        st.one_of(st.integers(1, 3), st.integers(1, 2 * cap), st.just(cap), st.integers(cap, 4 * cap)),
    ]))
    n_docs = draw(st.integers(0, 150))
    lengths = draw(st.lists(length, min_size=n_docs, max_size=n_docs))
    return dict(docs=make_docs(lengths), B=draw(st.integers(1, 3)), T=T,
                buffer_size=draw(st.integers(1, 16)), chunk_size=draw(st.integers(1, 8)))


@given(packing_cases())
def test_packing_follows_spec_and_matches_reference(case):
    docs, B, T, bs, cs = case["docs"], case["B"], case["T"], case["buffer_size"], case["chunk_size"]
    got = pack_all(docs, B, T, buffer_size=bs, chunk_size=cs)
    check_trace(docs, got, B, T, bs, cs)
    want = reference_pack(docs, B, T, bs, cs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["inputs"], w["inputs"])
        np.testing.assert_array_equal(g["targets"], w["targets"])


def test_default_buffer_matches_reference():
    rng = np.random.default_rng(0)
    docs = make_docs(np.clip(rng.lognormal(np.log(60), 1.0, size=3000).astype(int), 1, 2000))
    got = pack_all(docs, 4, 128)
    want = reference_pack(docs, 4, 128, 1000, 128)
    assert len(got) == len(want) > 10
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["inputs"], w["inputs"])


@pytest.mark.parametrize("B, T, buffer_size, msg", [(0, 8, 10, "batch_size"), (2, 0, 10, "seq_len"),
                                                     (2, 8, 0, "buffer_size")])
def test_bad_sizes(B, T, buffer_size, msg):
    with pytest.raises(ValueError, match=msg):
        BestFitCropIterDataset(source([[BOS]]), B, T, BOS, buffer_size=buffer_size)


@pytest.mark.parametrize("doc", [[5, 1, 2], []])
def test_doc_without_bos(doc):
    with pytest.raises(ValueError, match="starting with BOS"):
        pack_all([[BOS, 1], doc], 1, 4)


def endless(lengths):
    return source(make_docs(lengths), repeat=True)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_resume_is_exact(k):
    rng = np.random.default_rng(k)
    ds = BestFitCropIterDataset(endless(rng.integers(1, 90, size=500)), 3, 32, BOS, buffer_size=50, chunk_size=16)
    it = iter(ds)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON, as Grain's checkpoints store it
    want = take(it, 5)
    resumed = iter(ds)
    take(resumed, 2)  # a used iterator is fully overwritten too
    resumed.set_state(state)
    assert_same(take(resumed, 5), want)


@given(st.integers(0, 12), st.integers(1, 40), st.integers(1, 20))
def test_resume_anywhere(k, T, buffer_size):
    ds = BestFitCropIterDataset(endless(np.arange(1, 60) % (T + 8) + 1), 2, T, BOS, buffer_size=buffer_size,
                                chunk_size=7)
    it = iter(ds)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 3)
    resumed = iter(ds)
    resumed.set_state(state)
    assert_same(take(resumed, 3), want)


def test_resume_through_orbax(tmp_path):
    ds = BestFitCropIterDataset(endless(np.arange(200) % 70 + 1), 2, 48, BOS, buffer_size=40, chunk_size=8)
    it = iter(ds)
    take(it, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"ds": grain.checkpoint.CheckpointHandler()}) as mngr:
        mngr.save(4, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = take(it, 4)
        resumed = iter(ds)
        mngr.restore(4, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same(take(resumed, 4), want)
