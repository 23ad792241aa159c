"""SFT: best-fit padded packing with assistant-only targets, the LR rule, the lr-scaled and
weighted train steps, and a tiny model that memorizes its conversations end to end."""

import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nanochat_jax import optim, sharding
from nanochat_jax.checkpoint import Checkpointer
from nanochat_jax.config import GPTConfig
from nanochat_jax.data.sft import SFTPackIterDataset, sft_lr_multiplier
from nanochat_jax.scheduler import Engine
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train_step import init_train_state, make_train_step
from train import sft

BOS = 0


def reference_pack(convs, order, batch, T, buffer_size):
    """A plain restatement of the packing rule, for comparison."""
    it, buf, rows = iter(order), [], []
    while True:
        row = []
        while True:
            while len(buf) < buffer_size:
                ids, mask = convs[next(it)]
                buf.append((ids[:T + 1], mask[:T + 1]))
            room = T + 1 - len(row)
            fits = [i for i, (ids, _) in enumerate(buf) if len(ids) <= room]
            if not fits:
                break
            best = max(fits, key=lambda i: (len(buf[i][0]), -i))
            row += list(zip(*buf.pop(best)))
        row += [(BOS, 0)] * (T + 1 - len(row))
        rows.append(row)
        if len(rows) % batch == 0:
            yield rows[-batch:]


def conv_strategy():
    def make(n, seed):
        rng = np.random.default_rng(seed)
        ids = [BOS] + rng.integers(1, 50, n - 1).tolist()
        mask = [0] + rng.integers(0, 2, n - 1).tolist()
        return ids, mask
    return st.builds(make, st.integers(2, 40), st.integers(0, 10**6))


@settings(max_examples=30, deadline=None)
@given(convs=st.lists(conv_strategy(), min_size=1, max_size=12), T=st.integers(8, 48), batch=st.integers(1, 3),
       buffer_size=st.integers(1, 6))
def test_packing_matches_reference_and_masks_targets(convs, T, batch, buffer_size):
    ds = SFTPackIterDataset(lambda i: convs[i], len(convs), batch, T, BOS, buffer_size=buffer_size)
    it = iter(ds)
    order = (i % len(convs) for i in range(10**9))
    ref = reference_pack(convs, order, batch, T, buffer_size)
    for _ in range(3):
        got, want = next(it), next(ref)
        ids = np.array([[t for t, _ in r] for r in want])
        mask = np.array([[m for _, m in r] for r in want])
        np.testing.assert_array_equal(got["inputs"], ids[:, :-1])
        np.testing.assert_array_equal(got["targets"], np.where(mask[:, 1:] == 1, ids[:, 1:], -1))


def test_state_round_trip_and_process_striding():
    convs = [([BOS] + [i + 1] * (i % 7 + 1), [0] + [1] * (i % 7 + 1)) for i in range(40)]
    it = iter(SFTPackIterDataset(lambda i: convs[i], 40, 2, 16, BOS, buffer_size=5))
    next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON (Grain checkpoints)
    a = [next(it) for _ in range(4)]
    it.set_state(state)
    b = [next(it) for _ in range(4)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        assert x["consumed"] == y["consumed"]
    # two processes see disjoint conversations: p0 the even, p1 the odd ones
    seen = []
    for p in range(2):
        rows = next(iter(SFTPackIterDataset(lambda i: convs[i], 40, 1, 64, BOS, process_index=p, process_count=2,
                                            buffer_size=3)))["inputs"]
        seen.append({int(t) for t in rows.ravel() if t != BOS})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert all(t % 2 == 1 for t in seen[0]) and all(t % 2 == 0 for t in seen[1])


def test_bad_render_is_named():
    ds = SFTPackIterDataset(lambda i: ([5, 6], [0, 1]), 1, 1, 8, BOS)
    with pytest.raises(ValueError, match="conversation 0.*BOS"):
        next(iter(ds))


def test_lr_multiplier():
    assert sft_lr_multiplier(0.0) == sft_lr_multiplier(0.5) == 1.0
    assert sft_lr_multiplier(0.75) == pytest.approx(0.5)
    assert sft_lr_multiplier(1.0) == 0.0
    assert sft_lr_multiplier(0.9, warmdown_ratio=0.2, final_lr_frac=0.1) == pytest.approx(0.55)


CFG = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")


def _batch(seed, A=2, B=2, T=16):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 64, (A, B, T)).astype(np.int32)
    y = np.where(rng.random((A, B, T)) < 0.3, -1, rng.integers(0, 64, (A, B, T))).astype(np.int32)
    return x, y


@pytest.mark.slow  # the 3.12 leg deselects it: ~17 s of train-step compiles
def test_lr_scaled_step_equals_scaled_lrs():
    """Scaling the update by lrm is the same as scaling every LR (decoupled WD included)."""
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    kw = dict(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.1)
    tx = optim.make_optimizer(CFG, 10, lr_schedule=lambda it: 1.0, **kw)
    tx_half = optim.make_optimizer(CFG, 10, lr_schedule=lambda it: 0.3, **kw)
    x, y = _batch(0)
    s1 = init_train_state(CFG, tx, mesh, jax.random.key(1))
    s2 = init_train_state(CFG, tx_half, mesh, jax.random.key(1))
    # one step: from the second on, Adam's normalization amplifies rounding in near-zero gradients
    s1, m1 = make_train_step(CFG, tx, mesh)(s1, x, y, lrm=0.3)
    s2, m2 = make_train_step(CFG, tx_half, mesh)(s2, x, y)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # the 3.12 leg deselects it: ~17 s of train-step compiles
def test_weighted_step_is_weighted_token_sum():
    """weights = valid / (count · A) reproduce the mean-of-micro-means loss and its update."""
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    tx = optim.make_optimizer(CFG, 10)
    x, y = _batch(1)
    valid = (y >= 0).astype(np.float32)
    w = valid / valid.sum(axis=(1, 2), keepdims=True) / x.shape[0]
    s1, m1 = make_train_step(CFG, tx, mesh)(init_train_state(CFG, tx, mesh, jax.random.key(2)), x, y, w)
    s2, m2 = make_train_step(CFG, tx, mesh)(init_train_state(CFG, tx, mesh, jax.random.key(2)), x, y)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


CONVS = [
    [("user", "What is the capital of France?"), ("assistant", "Paris is the capital of France.")],
    [("user", "Say hello."), ("assistant", "Hello there, friend!")],
    [("user", "Count to three."), ("assistant", "One, two, three.")],
]


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    """A tokenizer, a random-init 'base run' checkpoint and a JSONL of the conversations."""
    d = tmp_path_factory.mktemp("sft")
    texts = [t for c in CONVS for _, t in c] * 20
    tok = Tokenizer.train(texts, 300)
    tok.save(d / "tok")
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                    window_pattern="L")
    tx = optim.make_optimizer(cfg, 10)
    state = init_train_state(cfg, tx, sharding.make_mesh("data=-1"), jax.random.key(0))
    meta = {"step": 0, "model_config": cfg.to_dict(), "max_seq_len": 64, "device_batch_size": 1,
            "total_batch_size": 64 * 8,
            "user_config": {"embedding_lr": 1.0, "unembedding_lr": 0.02, "matrix_lr": 0.05}}
    with Checkpointer(d / "base" / "checkpoints", async_save=False) as ckpt:
        ckpt.save(0, state, meta=meta)
    (d / "tasks" / "ARC-Easy").mkdir(parents=True)
    (d / "tasks" / "ARC-Easy" / "test.jsonl").write_text(json.dumps(
        {"id": "a", "question": "Say hello.", "choices": {"text": ["hi", "no"], "label": ["A", "B"]}, "answerKey": "A"}))
    (d / "tasks" / "GSM8K").mkdir()
    (d / "tasks" / "GSM8K" / "test.jsonl").write_text(json.dumps({"question": "Count to three.", "answer": "#### 3"}))
    lines = [json.dumps([{"role": r, "content": t} for r, t in c]) for c in CONVS]
    (d / "convs.jsonl").write_text("\n".join(lines) + "\n")
    return d, tok


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_tiny_model_memorizes_its_conversations(sft_setup, tmp_path):
    d, tok = sft_setup
    out = tmp_path / "sft"
    sft.main(["--base-dir", str(d / "base"), "--tokenizer-dir", str(d / "tok"), "--out-dir", str(out),
              "--mixture", f"jsonl={d / 'convs.jsonl'}", "--val-mixture", f"jsonl={d / 'convs.jsonl'}",
              "--num-iterations", "60", "--eval-every", "30", "--eval-tokens", "512", "--init-lr-frac", "1.0",
              # rows of 33 tokens hold one ~22-token conversation each: packed neighbours would otherwise
              # become context the memorized answers depend on, which a lone prompt doesn't have
              "--max-seq-len", "32",
              "--chatcore-every", "30", "--chatcore-tasks", "ARC-Easy|GSM8K|MMLU", "--task-data-dir", str(d / "tasks"),
              "--chatcore-max-sample", "2"])
    from nanochat_jax.checkpoint import load_params
    params, config, meta = load_params(out / "checkpoints")
    assert meta["step"] == 60 and meta["inherited"]["matrix_lr"] == 0.05
    engine = Engine(params, config, tok)
    for conv in CONVS:
        prompt = tok.render_for_completion({"messages": [{"role": r, "content": t} for r, t in conv]})
        got = engine.complete(prompt, max_tokens=20, temperature=0.0)
        text = tok.decode(got[0].tokens if hasattr(got[0], "tokens") else got[0])
        assert text.startswith(conv[1][1]), (conv, text)
    bpb = [json.loads(line)["val/bpb"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if "val/bpb" in line]
    assert len(bpb) == 3 and bpb[-1] < 0.2 * bpb[0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    core = [r for r in records if "chatcore" in r]
    assert [r["step"] for r in core] == [30, 60]  # MMLU has no data here: skipped with a note
    assert all(0 <= r["chatcore/ARC-Easy"] <= 1 and r["chatcore/GSM8K"] == 0 for r in core)
    assert (out / "report.md").is_file()


def test_errors(sft_setup, tmp_path):
    d, _ = sft_setup
    common = ["--tokenizer-dir", str(d / "tok"), "--out-dir", str(tmp_path / "o"), "--val-mixture", "none",
              "--chatcore-every", "-1"]
    with pytest.raises(SystemExit, match="no checkpoint directory .*nothing$"):
        sft.main(["--base-dir", str(tmp_path / "nothing"), "--mixture", f"jsonl={d / 'convs.jsonl'}", *common])
    with pytest.raises(SystemExit, match="unknown task"):
        sft.main(["--base-dir", str(d / "base"), "--mixture", "wikipedia", *common])
    with pytest.raises(SystemExit, match="not a multiple"):
        sft.main(["--base-dir", str(d / "base"), "--mixture", f"jsonl={d / 'convs.jsonl'}",
                  "--total-batch-size", "100", *common])


def test_mixture_strings(tmp_path):
    from nanochat_jax.tasks.spec import parse_entry, parse_mixture

    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(10)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    task, rep = parse_entry(f"jsonl={path}[2:-3]*4")
    assert rep == 4 and [c["messages"][0]["content"] for c in task] == [f"q{i}" for i in range(2, 7)]
    assert [c["messages"][0]["content"] for c in parse_entry(f"jsonl={path}[-2:]")[0]] == ["q8", "q9"]
    mix = parse_mixture(f"jsonl={path}[:3]*2, jsonl={path}[5:6]")
    assert len(mix) == 7 and sorted(c["messages"][0]["content"] for c in mix) == ["q0", "q0", "q1", "q1", "q2", "q2", "q5"]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    gsm, _ = parse_entry("gsm8k@train", tmp_path)
    assert len(gsm) == 1 and gsm.evaluate(gsm[0], "#### 2") == 1
    for bad, msg in (("gsm8k@train[5:]", "empty"), ("nope", "unknown task"), ("gsm8k[1:2", "bad task entry")):
        with pytest.raises(ValueError, match=msg):
            parse_entry(bad, tmp_path)


def _SigtermAt(step):
    """A StopSignals that reports a SIGTERM when the loop asks at `step` (it asks once per step)."""
    import signal

    from nanochat_jax.common import StopSignals

    class SigtermAt(StopSignals):
        def requested(self):
            self.asked = getattr(self, "asked", -1) + 1
            if self.asked == step:
                self.signum = signal.SIGTERM
            return super().requested()
    return SigtermAt


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_resume_is_exact(sft_setup, tmp_path, monkeypatch):
    """A run stopped by SIGTERM saves a final checkpoint (step 3) and, resumed from it, logs the same losses
    at steps 3-5 as one that never stopped; the base run is only read (no writability probe there), and an
    output dir holds one run."""
    from nanochat_jax import checkpoint
    from nanochat_jax.report import read_metrics

    probed = []
    probe = checkpoint.check_writable
    monkeypatch.setattr(checkpoint, "check_writable", lambda d: (probed.append(d), probe(d)))
    d, _ = sft_setup
    common = ["--base-dir", str(d / "base"), "--tokenizer-dir", str(d / "tok"), "--mixture", f"jsonl={d / 'convs.jsonl'}",
              "--val-mixture", "none", "--chatcore-every", "-1", "--num-iterations", "6", "--max-seq-len", "32"]
    sft.main([*common, "--out-dir", str(tmp_path / "a")])
    monkeypatch.setattr(sft, "StopSignals", _SigtermAt(3))  # as if SIGTERM came during step 2
    with pytest.raises(SystemExit) as stopped:
        sft.main([*common, "--out-dir", str(tmp_path / "b")])
    assert stopped.value.code == 143 and (tmp_path / "b" / "checkpoints" / "3" / "commit_success.txt").is_file()
    monkeypatch.undo()
    assert probed and not any(str(d / "base") in p for p in probed), probed
    with pytest.raises(SystemExit, match=r"already holds a run \(checkpoints at steps \[3\]\)"):
        sft.main([*common, "--out-dir", str(tmp_path / "b")])
    sft.main([*common, "--out-dir", str(tmp_path / "b"), "--resume"])
    losses = {}
    for run in ("a", "b"):
        for r in read_metrics(tmp_path / run / "metrics.jsonl"):
            if "train/loss_raw" in r:
                losses.setdefault(run, {})[r["step"]] = r["train/loss_raw"]  # the resumed run re-logs 3-5
    assert losses["a"] == losses["b"] and sorted(losses["a"]) == list(range(6))
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        sft.main([*common, "--out-dir", str(tmp_path / "c"), "--resume"])
