"""RL: rollouts and their masks, the REINFORCE loss scaling, and reward rising on a toy task."""

import itertools

import jax
import numpy as np
import pytest

from nanochat_jax import model, optim, sharding
from nanochat_jax.config import GPTConfig
from nanochat_jax.scheduler import Engine
from nanochat_jax.tasks.common import Task
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train_step import init_train_state, make_train_step
from train import rl

PAIRS = list(itertools.product(range(3), range(3)))


class ToyAddition(Task):
    """'What is a+b?' → the digit, checked exactly."""

    def __init__(self, answers=None, **kw):
        self.answers = answers  # per-example answers to train on (noise for the warm-up)
        super().__init__(**kw)

    def num_examples(self):
        return len(PAIRS)

    def get_example(self, i):
        a, b = PAIRS[i]
        ans = str(a + b) if self.answers is None else self.answers[i]
        return {"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                             {"role": "assistant", "content": ans}], "sum": a + b}

    def evaluate(self, conversation, completion):
        return int(completion.strip() == str(conversation["sum"]))


@pytest.fixture(scope="module")
def toy():
    texts = [f"What is {a}+{b}? {a + b}" for a, b in PAIRS] * 30
    tok = Tokenizer.train(texts, 270)
    cfg = GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                    window_pattern="L")
    return tok, cfg


def format_warmup(tok, cfg, steps=60):
    """A model that answers with *some* digit in 0..4 (trained on random answers): reward ≈ 1/5."""
    rng = np.random.default_rng(0)
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    tx = optim.make_optimizer(cfg, steps, embedding_lr=0.5, unembedding_lr=0.02, matrix_lr=0.05, warmup_steps=0)
    state = init_train_state(cfg, tx, mesh, jax.random.key(0))
    step = make_train_step(cfg, tx, mesh)
    for _ in range(steps):
        task = ToyAddition(answers=[str(d) for d in rng.integers(0, 5, len(PAIRS))])
        rows = np.full((8, cfg.sequence_len + 1), tok.bos_token_id, np.int32)
        masks = np.zeros_like(rows)
        for r in range(8):
            ids, mask = tok.render_conversation(task[int(rng.integers(len(PAIRS)))])
            rows[r, :len(ids)], masks[r, :len(ids)] = ids, mask
        targets = np.where(masks[:, 1:] == 1, rows[:, 1:], -1)
        state, _ = step(state, rows[None, :, :-1], targets[None])
    return jax.device_get(state.params)


def test_rollout_masks_and_padding(toy):
    tok, cfg = toy
    params = model.init_params(cfg, jax.random.key(1))
    engine = Engine(params, cfg, tok)
    c = rl.RLConfig(num_samples=4, device_batch_size=2, max_new_tokens=5)
    pad = tok.encode_special("<|assistant_end|>")
    conv = ToyAddition()[4]
    ids, mask, rewards, lengths = rl.rollout_batch(engine, conv, ToyAddition(), c, seed=3, seq_len=32, pad_id=pad)
    prompt = tok.render_for_completion(conv)
    assert ids.shape == (4, 33) and rewards.shape == (4,)
    for row, m, n in zip(ids, mask, lengths):
        assert list(row[:len(prompt)]) == prompt and not m[:len(prompt)].any()
        assert m[len(prompt):len(prompt) + n].all() and not m[len(prompt) + n:].any()
        assert (row[len(prompt) + n:] == pad).all()
    with pytest.raises(ValueError, match="multiple of device_batch_size"):
        rl.train(params, cfg, tok, ToyAddition(), rl.RLConfig(num_samples=3, device_batch_size=2))


@pytest.mark.slow  # the 3.12 leg deselects it: ~15 s; the objective is plain math
def test_weights_reproduce_upstream_objective(toy):
    """The weighted step's loss equals −Σ logp·A / (valid tokens of the pass · passes · examples)."""
    tok, cfg = toy
    params = jax.device_get(model.init_params(cfg, jax.random.key(2)))  # host copy: the step donates its state
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (2, 4, 33)).astype(np.int32)
    targets = np.where(rng.random((2, 4, 32)) < 0.5, ids[..., 1:], -1).astype(np.int32)
    adv = rng.normal(size=(2, 4, 1)).astype(np.float32)
    valid = targets >= 0
    w = np.where(valid, adv, 0) / (valid.sum(axis=(1, 2), keepdims=True) * 2 * 1)
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    tx = optim.make_optimizer(cfg, 10)
    _, m = make_train_step(cfg, tx, mesh)(init_train_state(cfg, tx, mesh, jax.random.key(0), params=params),
                                          ids[..., :-1], targets, w.astype(np.float32))
    expected = 0.0
    for p in range(2):
        nll = np.asarray(model.loss_fn(params, ids[p, :, :-1], targets[p], cfg, reduction="none")).reshape(4, 32)
        expected += float((nll * np.where(valid[p], adv[p], 0)).sum() / (valid[p].sum() * 2))
    assert float(m["loss"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_reward_rises_on_toy_addition(toy, tmp_path):
    tok, cfg = toy
    params = format_warmup(tok, cfg)
    c = rl.RLConfig(num_steps=30, examples_per_step=9, num_samples=16, device_batch_size=8, max_new_tokens=3,
                    top_k=0, init_lr_frac=1.0, eval_every=30, eval_examples=9, save_every=-1)
    one = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    _, records = rl.train(params, cfg, tok, ToyAddition(), c, val_task=ToyAddition(), out_dir=tmp_path, mesh=one,
                          say=print)
    rewards = [r["reward"] for r in records if "reward" in r]
    first, last = np.mean(rewards[:8]), np.mean(rewards[-8:])
    print("rewards", np.round(rewards, 2))
    # the warm-up answers at random (≈ 1/5 right); within 30 steps the policy has moved towards
    # the answers that pay (measured: 0.23 → 0.36 mean reward, pass@1 0.22 → 0.44)
    assert first < 0.3 and last > first + 0.08, rewards
    evals = [r for r in records if "pass@1" in r]
    assert len(evals) == 2 and evals[-1]["pass@1"] > evals[0]["pass@1"]
    assert evals[-1]["pass@8"] >= evals[-1]["pass@1"]
    assert (tmp_path / "checkpoints" / "30" / "commit_success.txt").is_file()


@pytest.mark.slow  # the 3.12 leg deselects it: the CLI end to end, ~16 s
def test_cli_on_local_gsm8k(toy, tmp_path):
    """python -m train.rl end to end: local GSM8K files, a checkpoint, a report with pass@k."""
    import json

    from nanochat_jax.checkpoint import Checkpointer

    tok, cfg = toy
    tok.save(tmp_path / "tok")
    rows = [{"question": f"What is {a}+{b}?", "answer": f"<<{a}+{b}={a + b}>>#### {a + b}"} for a, b in PAIRS]
    for split in ("train", "test"):
        (tmp_path / "data" / "gsm8k").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tx = optim.make_optimizer(cfg, 10)
    state = init_train_state(cfg, tx, sharding.make_mesh("data=-1"), jax.random.key(0))
    with Checkpointer(tmp_path / "sft" / "checkpoints", async_save=False) as ckpt:
        ckpt.save(7, state, meta={"step": 7, "model_config": cfg.to_dict()})
    out = tmp_path / "rl"
    rl.main(["--sft-dir", str(tmp_path / "sft"), "--tokenizer-dir", str(tmp_path / "tok"), "--task-data-dir",
             str(tmp_path / "data"), "--task", "gsm8k@train[:4]", "--val-task", "gsm8k@test[:2]", "--num-steps", "2",
             "--examples-per-step", "2", "--num-samples", "8", "--device-batch-size", "8", "--max-new-tokens", "4",
             "--eval-every", "2", "--eval-examples", "2", "--out-dir", str(out)])
    assert (out / "checkpoints" / "2" / "commit_success.txt").is_file()
    report = (out / "report.md").read_text()
    assert "pass@8" in report and "last_reward" in report
    base = ["--sft-dir", str(tmp_path / "sft"), "--tokenizer-dir", str(tmp_path / "tok")]
    with pytest.raises(SystemExit, match="unknown task"):
        rl.main([*base, "--task", "chess", "--out-dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()  # a run that failed leaves no directory behind
    # the output is checked before any task is loaded ("chess" would fail later)
    with pytest.raises(SystemExit, match=r"rl already holds a run \(checkpoints at steps \[2\]\)"):
        rl.main([*base, "--task", "chess", "--out-dir", str(out)])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write the output directory .*file/rl"):
        rl.main([*base, "--task", "chess", "--out-dir", str(tmp_path / "file" / "rl")])
    with pytest.raises(SystemExit, match="--num-samples 8 must be a multiple of --device-batch-size 3"):
        rl.main([*base, "--num-samples", "8", "--device-batch-size", "3"])


def test_sigterm_ends_with_a_final_checkpoint(toy, tmp_path, capsys):
    import signal

    from nanochat_jax.checkpoint import load_params
    from nanochat_jax.common import StopSignals

    tok, cfg = toy
    params = model.init_params(cfg, jax.random.key(0))
    stop = StopSignals()  # not installed: the flag is set as a signal would set it
    stop.signum = signal.SIGTERM
    c = rl.RLConfig(num_steps=5, examples_per_step=1, num_samples=8, device_batch_size=8, max_new_tokens=2,
                    eval_every=-1, save_every=-1)
    one = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    with pytest.raises(SystemExit) as e:
        rl.train(params, cfg, tok, ToyAddition(), c, out_dir=tmp_path, mesh=one, stop=stop)
    assert e.value.code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM at step 0; checkpoint step 0 is in {tmp_path / 'checkpoints'}; RL has no --resume; "
        "evaluate or serve this checkpoint as it is")
    assert load_params(tmp_path)[2]["step"] == 0
