"""Prefix reuse across turns (nanochat_jax/prefix_cache.py, engine.prefill_from): a prompt that
continues a stored one gives exactly what a cold prefill gives."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import SP, TOK, random_params

from nanochat_jax import engine, scheduler
from nanochat_jax.config import GPTConfig
from nanochat_jax.prefix_cache import PrefixCache

F32 = jnp.float32
CONFIG = GPTConfig(sequence_len=128, vocab_size=TOK.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                   window_pattern="SL")


@pytest.fixture(scope="module")
def eng():
    return scheduler.Engine(random_params(CONFIG, seed=5), CONFIG, TOK, dtype=F32)


def _prefill(eng, tokens):
    padded = np.zeros((1, engine.bucket_length(len(tokens), CONFIG.sequence_len)), np.int32)
    padded[0, :len(tokens)] = tokens
    return engine.prefill(eng.params, jnp.asarray(padded), len(tokens), config=CONFIG, dtype=F32)


def _greedy(eng, prefix, steps=8):
    state = engine.init_state(CONFIG, 2, CONFIG.sequence_len, eng.stop_ids, F32)
    state = engine.insert(state, prefix, 1, np.zeros(2, np.uint32), 0.0, 0, 1.0, steps)
    out = [int(state.last_token_S[1])]
    for _ in range(steps - 1):
        state, tokens, _ = engine.generate_step(state, eng.params, jnp.full((2,), -1, jnp.int32), config=CONFIG,
                                                dtype=F32)
        out.append(int(tokens[1]))
    return out


@pytest.mark.parametrize("cut", [1, 16, 23, 40])
def test_prefill_in_two_parts_equals_cold_prefill(eng, cut):
    prompt = [SP["<|bos|>"], *TOK.encode("The prefix store keeps earlier turns of a chat around.")][:50]
    n = len(prompt)
    cold = _prefill(eng, prompt)
    rest = np.zeros((1, engine.bucket_length(n - cut, CONFIG.sequence_len)), np.int32)
    rest[0, :n - cut] = prompt[cut:]
    warm = engine.prefill_from(eng.params, _prefill(eng, prompt[:cut])._replace(logits_V=None), jnp.asarray(rest),
                               n - cut, total=cold.k_cache[0].shape[2], config=CONFIG, dtype=F32)
    assert int(warm.length) == n
    np.testing.assert_allclose(warm.logits_V, cold.logits_V, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(warm.prev_C, cold.prev_C, rtol=1e-5, atol=1e-5)
    for a, b in zip(warm.k_cache + warm.v_cache, cold.k_cache + cold.v_cache):
        assert a.shape == b.shape
        np.testing.assert_allclose(a[:, :, :n], b[:, :, :n], rtol=1e-5, atol=1e-5)
    assert _greedy(eng, warm) == _greedy(eng, cold)


def _run(sched, prompt, **kw):
    got = []
    req = sched.submit(scheduler.Request(list(prompt), lambda ev: None, max_tokens=6,
                                         on_token=lambda tick, i, tok, code, forced: got.append(tok), **kw))
    while not all(ch.done for ch in req.choices):
        sched.run_once()
    assert req.error is None
    return got


def _conversation(eng, cache_bytes, **kw):
    sched = scheduler.Scheduler(eng, slots=2, thread=False, prefix_cache_bytes=cache_bytes)
    prompt, replies = [SP["<|bos|>"]] + TOK.encode("You are a terse assistant."), []
    for turn in ("hi there, who are you?", "and what can you do", "thanks!"):
        prompt += [SP["<|user_start|>"], *TOK.encode(turn), SP["<|user_end|>"], SP["<|assistant_start|>"]]
        replies.append(_run(sched, prompt, **kw))
        prompt += [*replies[-1], SP["<|assistant_end|>"]]
    return replies, sched.prefix_cache


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=7)])
def test_three_turns_same_tokens_with_and_without_the_store(eng, kw):
    cold, off = _conversation(eng, 0, **kw)
    warm, store = _conversation(eng, 1 << 20, **kw)
    assert off is None
    assert warm == cold
    assert store.stats()["hits"] == 2 and store.stats()["reused_tokens"] > 0


def test_partial_and_unrelated_prompts(eng):
    """A prompt that leaves a stored one midway, or shares nothing, misses and still matches a cold run."""
    base = [SP["<|bos|>"]] + TOK.encode("a shared system prompt, then a question")
    forked = base[:20] + TOK.encode(" that goes elsewhere")
    other = TOK.encode("nothing in common with the rest at all")
    off = scheduler.Scheduler(eng, slots=1, thread=False)
    on = scheduler.Scheduler(eng, slots=1, thread=False, prefix_cache_bytes=1 << 20)
    for prompt in (base, forked, other, base, base + TOK.encode("?")):
        assert _run(on, prompt, temperature=0.0) == _run(off, prompt, temperature=0.0)
    stats = on.prefix_cache.stats()
    assert (stats["hits"], stats["reused_tokens"]) == (1, len(base))  # only the last prompt extends a stored one


def _fake(n_bytes):
    """A stored-prefix stand-in of n_bytes (fp32 k and v)."""
    half = jnp.zeros((n_bytes // 8,), F32)
    return engine.Prefix((half,), (half,), jnp.zeros((), jnp.int32)[()], jnp.zeros((0,), F32), jnp.ones((9,), F32))


def test_lru_eviction_respects_the_bound():
    size = 1024 + 4  # k + v + the int32 length (logits are not kept)
    store = PrefixCache(max_bytes=2 * size)
    a, b, c = ([t] * 20 for t in (1, 2, 3))
    store.store(a, _fake(1024))
    store.store(b, _fake(1024))
    assert store.bytes == 2 * size and len(store) == 2
    assert store.lookup(a + [9])[0] == 20  # a is now the most recently used
    store.store(c, _fake(1024))
    assert store.bytes <= store.max_bytes and len(store) == 2
    assert store.lookup(b + [9]) == (0, None)  # b was the least recently used
    assert store.lookup(a + [9])[0] == 20 and store.lookup(c + [9])[0] == 20
    store.store([4] * 20, _fake(4096))  # larger than the whole bound: not kept, nothing evicted
    assert len(store) == 2 and store.lookup([4] * 21) == (0, None)
    store.store([5] * 3, _fake(8))  # too short to be worth an entry
    assert len(store) == 2


def test_never_covers_the_whole_prompt():
    """The last prompt token must be fed to get the next-token logits."""
    store = PrefixCache(max_bytes=1 << 20)
    p = list(range(20))
    store.store(p, _fake(64))
    store.store(p[:16], _fake(64))
    assert store.lookup(p)[0] == 16
    assert store.lookup(p[:16])[0] == 0
    assert store.lookup(p + [7])[0] == 20


def test_warmup_compiles_cold_prefills_and_keeps_nothing(eng, monkeypatch):
    sched = scheduler.Scheduler(eng, slots=2, thread=False, prefix_cache_bytes=1 << 20)
    calls = []
    monkeypatch.setattr(engine, "prefill_from", lambda *a, **k: calls.append(a))
    sched._warmup()
    assert not calls and len(sched.prefix_cache) == 0 and sched.prefix_cache.stats()["hits"] == 0
