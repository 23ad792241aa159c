"""Bits per byte against a float64 numpy computation; specials and -1 excluded; sharded = unsharded."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from nanochat_jax import model, sharding
from nanochat_jax.config import GPTConfig
from nanochat_jax.evals.bpb import evaluate_bpb, make_bpb_fn

CFG = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
SPECIALS = (0, 1, 2)
B, T = 8, 32


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0), "float32")


@pytest.fixture(scope="module")
def token_bytes():
    tb = np.random.default_rng(0).integers(1, 7, CFG.vocab_size).astype(np.int32)
    tb[list(SPECIALS)] = 0
    return tb


@pytest.fixture(scope="module")
def batches():
    """Two batches whose targets include special tokens and -1 in known places."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(2):
        inputs = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
        targets = rng.integers(len(SPECIALS), CFG.vocab_size, (B, T)).astype(np.int32)
        targets[:, ::5] = rng.choice(SPECIALS, targets[:, ::5].shape)
        targets[:, 3::7] = -1
        out.append({"inputs": inputs, "targets": targets})
    return out


def hand_sums(params, batch, token_bytes):
    """(nats, bytes) by hand: float64 log-softmax of the model's logits, counted targets only."""
    logits = np.asarray(model.forward(params, batch["inputs"], CFG, dtype="float32"), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    t = batch["targets"]
    counted = (t >= 0) & (token_bytes[np.maximum(t, 0)] > 0)
    nll = -np.take_along_axis(logp, np.maximum(t, 0)[..., None], -1)[..., 0]
    return nll[counted].sum(), int(token_bytes[t[counted]].sum())


def test_batch_sums_match_hand_computation(params, batches, token_bytes):
    fn = make_bpb_fn(CFG, dtype="float32")
    for batch in batches:
        nats, nbytes = fn(params, batch["inputs"], batch["targets"], token_bytes)
        want_nats, want_bytes = hand_sums(params, batch, token_bytes)
        assert int(nbytes) == want_bytes
        np.testing.assert_allclose(float(nats), want_nats, rtol=1e-5)


def test_evaluate_bpb_is_nats_over_ln2_bytes(params, batches, token_bytes):
    sums = [hand_sums(params, b, token_bytes) for b in batches]
    want = sum(n for n, _ in sums) / (math.log(2) * sum(b for _, b in sums))
    got = evaluate_bpb(params, batches, CFG, token_bytes, dtype="float32")
    assert got == pytest.approx(want, rel=1e-5)
    assert 0.5 < got < 10  # a random init on a 64-token vocab: ~ln(64) nats over ~3.5 bytes


def test_specials_and_ignored_targets_count_nothing(params, batches, token_bytes):
    """Excluded targets add no nats and no bytes, so making more of them excluded leaves the rest unchanged."""
    fn = make_bpb_fn(CFG, dtype="float32")
    batch = batches[0]
    excluded = batch["targets"].copy()
    excluded[:, ::2] = -1
    excluded[:, 1::4] = SPECIALS[0]
    keep = excluded >= len(SPECIALS)
    nats_all, bytes_all = hand_sums(params, batch, token_bytes)
    nats, nbytes = fn(params, batch["inputs"], excluded, token_bytes)
    want_nats, want_bytes = hand_sums(params, {"inputs": batch["inputs"], "targets": excluded}, token_bytes)
    assert int(nbytes) == want_bytes == int(token_bytes[excluded[keep]].sum()) < bytes_all
    np.testing.assert_allclose(float(nats), want_nats, rtol=1e-5)
    assert want_nats < nats_all
    none = {"inputs": batch["inputs"], "targets": np.where(batch["targets"] % 2 == 0, -1, SPECIALS[1])}
    nats, nbytes = fn(params, none["inputs"], none["targets"], token_bytes)
    assert float(nats) == 0.0 and int(nbytes) == 0
    assert evaluate_bpb(params, [none], CFG, token_bytes, dtype="float32") == math.inf


def _data_mesh():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    split0 = lambda x: NamedSharding(mesh, P("data") if x.shape[0] % 8 == 0 else P())  # noqa: E731
    return mesh, split0


@pytest.mark.parametrize("layout", ["data-mesh", "data=2,fsdp=2,model=2"])
def test_sharded_params_and_batches_give_global_sums(params, batches, token_bytes, layout):
    want = evaluate_bpb(params, batches, CFG, token_bytes, dtype="float32")
    if layout == "data-mesh":
        mesh, split0 = _data_mesh()
        sharded = jax.tree.map(lambda x: jax.device_put(x, split0(x)), params)
        rows = NamedSharding(mesh, P("data", None))
        feed = [{k: jax.device_put(v, rows) for k, v in b.items()} for b in batches]  # pre-sharded arrays
    else:
        mesh = sharding.make_mesh(layout)
        sharded = jax.device_put(params, sharding.param_shardings(model.param_axes(CFG), mesh))
        feed = batches  # host arrays: evaluate_bpb splits them over the mesh
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(sharded))
    got = evaluate_bpb(sharded, feed, CFG, token_bytes, dtype="float32", mesh=mesh)
    assert got == pytest.approx(want, rel=1e-5)
