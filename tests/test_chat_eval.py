"""Chat evaluation: letter-logit scoring, pass@k through the batched engine, ChatCORE, the CLI."""

import json

import jax
import numpy as np
import pytest

from nanochat_jax import model, optim, sharding
from nanochat_jax.checkpoint import Checkpointer
from nanochat_jax.config import GPTConfig
from nanochat_jax.scheduler import Engine
from nanochat_jax.evals import chat
from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train_step import init_train_state
from train import chat_eval

LETTERS = ["A", "B", "C", "D"]


def arc_rows(n, answer):
    return [{"id": f"q{i}", "question": f"Which number is {i}?",
             "choices": {"text": [str(i), str(i + 1), str(i + 2), str(i + 3)], "label": LETTERS},
             "answerKey": answer(i)} for i in range(n)]


def gsm_rows(n):
    return [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(n)]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_eval")
    texts = [r["question"] + " " + " ".join(r["choices"]["text"]) for r in arc_rows(30, lambda i: "A")]
    texts += [r["question"] + r["answer"] for r in gsm_rows(30)] + ["A B C D = - Multiple Choice question"] * 5
    tok = Tokenizer.train(texts * 5, 300)
    tok.save(d / "tok")
    cfg = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                    window_pattern="L")
    params = jax.device_get(model.init_params(cfg, jax.random.key(0)))
    # Every token embeds alike and the blocks' output projections are zero at init, so the
    # logits are the same at every position of every prompt: the model has one fixed letter.
    params["wte"] = np.broadcast_to(params["wte"][:1], params["wte"].shape).copy()
    for name in list(params):
        if name.startswith("ve_"):
            params[name] = np.zeros_like(params[name])
    return d, tok, cfg, params


def favourite(setup):
    d, tok, cfg, params = setup
    logits = np.asarray(model.forward(params, np.array([[tok.bos_token_id, 5, 6]]), cfg))[0, -1]
    return LETTERS[int(np.argmax(logits[chat.letter_ids(tok, LETTERS)]))]


def test_categorical_scores_a_model_that_prefers_the_right_letter_as_100(setup, tmp_path):
    d, tok, cfg, params = setup
    fav = favourite(setup)
    other = LETTERS[(LETTERS.index(fav) + 1) % 4]
    write_jsonl(tmp_path / "right" / "test.jsonl", arc_rows(11, lambda i: fav))
    write_jsonl(tmp_path / "wrong" / "test.jsonl", arc_rows(11, lambda i: other))
    right = ARC("ARC-Easy", "test", data_dir=tmp_path / "right")
    wrong = ARC("ARC-Easy", "test", data_dir=tmp_path / "wrong")
    assert chat.categorical_accuracy(params, cfg, tok, right, batch_size=4) == (11, 11)
    assert chat.categorical_accuracy(params, cfg, tok, wrong, batch_size=4) == (0, 11)
    assert chat.categorical_accuracy(params, cfg, tok, right, batch_size=4, max_problems=5) == (5, 5)
    scores = chat.chatcore({"ARC-Easy": 1.0, "MMLU": 0.25})
    assert scores == {"chatcore": 0.5, "chatcore_cat": 0.5}


def test_letter_logits_are_taken_at_the_assistant_start(setup, tmp_path):
    """On a random model (logits vary by position), the batched, padded scorer picks what a plain
    forward of each prompt alone gives at its last position."""
    _, tok, cfg, _ = setup
    params = model.init_params(cfg, jax.random.key(3))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape, p.dtype), params)
    write_jsonl(tmp_path / "t" / "test.jsonl", arc_rows(7, lambda i: LETTERS[i % 4]))
    task = ARC("ARC-Easy", "test", data_dir=tmp_path / "t")
    expected = 0
    for conv in task:
        ids = tok.render_for_completion(conv)
        logits = np.asarray(model.forward(params, np.array([ids]), cfg))[0, -1]
        pick = LETTERS[int(np.argmax(logits[chat.letter_ids(tok, LETTERS)]))]
        expected += pick == conv["messages"][-1]["content"]
    assert chat.categorical_accuracy(params, cfg, tok, task, batch_size=3) == (expected, 7)
    with pytest.raises(ValueError, match="encodes to"):
        chat.letter_ids(tok, ["Multiple"])


def test_generative_pass_at_k(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", gsm_rows(6))
    task = GSM8K("main", "test", data_dir=tmp_path)

    class Tok:
        def render_for_completion(self, conv):
            return conv["messages"][0]["content"]

    def right_second(prompts):  # sample 0 wrong, sample 1 right (for even numbers only)
        out = []
        for p in prompts:
            i = int(p.split()[2])
            out.append(["#### -1", f"so #### {2 * i}" if i % 2 == 0 else "#### 0"])
        return out
    assert chat.generative_accuracy(right_second, Tok(), task, chunk=4) == (3, 6)
    assert chat.generative_accuracy(lambda ps: [["#### 7"] for _ in ps], Tok(), task, max_problems=2) == (0, 2)


@pytest.mark.slow  # the 3.12 leg deselects it: ~14 s of decode compiles
def test_engine_sampler_matches_engine_complete(setup):
    """The continuous-batching sampler gives each prompt what Engine.complete gives it alone."""
    from nanochat_jax.scheduler import Scheduler

    _, tok, cfg, _ = setup
    engine = Engine(model.init_params(cfg, jax.random.key(5)), cfg, tok)
    prompts = [tok.render_for_completion({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]})
               for i in range(5)]
    sched = Scheduler(engine, slots=4, max_queue=64)
    try:
        got = chat.scheduler_sampler(sched, num_samples=2, max_tokens=12, temperature=0.0)(prompts)
    finally:
        sched.close()
    for p, texts in zip(prompts, got):
        solo = engine.complete(p, max_tokens=12, temperature=0.0)[0]
        assert texts == [tok.decode(solo.tokens)] * 2


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
def test_cli(setup, tmp_path):
    d, tok, cfg, params = setup
    fav = favourite(setup)
    write_jsonl(tmp_path / "tasks" / "ARC-Easy" / "test.jsonl", arc_rows(6, lambda i: fav))
    write_jsonl(tmp_path / "tasks" / "GSM8K" / "test.jsonl", gsm_rows(3))
    tx = optim.make_optimizer(cfg, 10)
    state = init_train_state(cfg, tx, sharding.make_mesh("data=-1"), jax.random.key(0), params=params)
    with Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as ckpt:
        ckpt.save(5, state, meta={"step": 5, "model_config": cfg.to_dict()})
    out = tmp_path / "res.json"
    res = chat_eval.main(["--checkpoint", str(tmp_path / "run"), "--tokenizer-dir", str(d / "tok"), "-a",
                          "ARC-Easy|GSM8K", "--task-data-dir", str(tmp_path / "tasks"), "-m", "8", "--out", str(out)])
    assert res["ARC-Easy"] == 1.0 and res["GSM8K"] == 0.0
    assert res["chatcore"] == pytest.approx(0.5) and res["chatcore_cat"] == pytest.approx(1.0)
    assert json.loads(out.read_text()) == res
    with pytest.raises(SystemExit, match="unknown task"):
        chat_eval.main(["--checkpoint", str(tmp_path / "run"), "--tokenizer-dir", str(d / "tok"), "-a", "Nope"])
