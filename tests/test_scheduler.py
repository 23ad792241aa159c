"""The generation host loop: upstream's Engine behaviours and the calculator tool (docs/numerics.md#generation).
The server-facing Scheduler is exercised through the HTTP app in test_serve.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import SP, TINY, TOK, B, _tool_chain, bigram_params, random_params, uniform_params

from nanochat_jax import model, scheduler
from nanochat_jax.config import GPTConfig

F32 = jnp.float32


def test_greedy_engine_matches_model_generate():
    config = GPTConfig(sequence_len=128, vocab_size=TOK.vocab_size, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                       window_pattern="SL")
    params = random_params(config, seed=3)
    prompt = [SP["<|bos|>"], *TOK.encode("hello there")]
    want = list(model.generate(params, prompt, config, 24, temperature=0.0, dtype=F32))
    eng = scheduler.Engine(params, config, TOK, dtype=F32)
    got = [col[0] for col, _ in eng.generate(prompt, max_tokens=24, temperature=0.0)]
    stops = [i for i, t in enumerate(want) if t in eng.stop_ids]
    assert got == want[:stops[0] + 1 if stops else 24]


def numpy_params(config, seed):
    """Random params drawn in numpy on init's tree (no init compile per config): every block,
    smear and backout active, lm_head wide for clear greedy margins."""
    rng = np.random.default_rng(seed)
    fixed = {"resid_lambdas": 1.0, "x0_lambdas": 0.1, "smear_lambda": 0.7, "backout_lambda": 0.2}

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        base = next((v for k, v in fixed.items() if k in name), None)
        if base is not None:
            return jnp.asarray(base + 0.05 * noise)
        if "lm_head" in name:
            return jnp.asarray(0.5 * noise)
        embedding = leaf.shape[0] == config.padded_vocab_size
        return jnp.asarray(noise if embedding else leaf.shape[0] ** -0.5 * noise)

    shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0), F32))
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.slow  # runs in the 3.11 leg; the 3.12/newest-JAX leg deselects it
@settings(max_examples=6, deadline=None)
@given(depth=st.integers(1, 3), heads=st.sampled_from([(2, 2), (4, 4), (4, 2), (4, 1)]),
       pattern=st.sampled_from(["L", "SL", "SSL"]), seq_len=st.sampled_from([136, 144]),
       prompt_len=st.integers(100, 120), new=st.integers(50, 64), steps=st.sampled_from([1, 4]),
       seed=st.integers(0, 1000))
def test_greedy_engine_matches_naive_generate_property(depth, heads, pattern, seq_len, prompt_len, new, steps, seed):
    """Random small models whose windows (short 128, long = seq_len <= 144) are all shorter than prompt +
    generation: the cached engine's greedy tokens equal the full-recompute model.generate's.
    Prompts land in one bucket (128) and all caches in one length (256), so shapes stay few."""
    config = GPTConfig(sequence_len=seq_len, vocab_size=TOK.vocab_size, n_layer=depth, n_head=heads[0],
                       n_kv_head=heads[1], n_embd=64, window_pattern=pattern)
    assert max(config.window_sizes) < prompt_len + new
    params = numpy_params(config, seed)
    rng = np.random.default_rng(seed)
    prompt = [SP["<|bos|>"], *rng.integers(0, 256, prompt_len - 1).tolist()]
    want = list(model.generate(params, prompt, config, new, temperature=0.0, dtype=F32))
    eng = scheduler.Engine(params, config, TOK, dtype=F32, steps_per_call=steps)
    got = [col[0] for col, _ in eng.generate(prompt, max_tokens=new, temperature=0.0)]
    stops = [i for i, t in enumerate(want) if t in eng.stop_ids]
    assert got == want[:stops[0] + 1 if stops else new]


# ---- upstream's Engine behaviours (uniform mock model) -------------------------------------------

@pytest.fixture(scope="module")
def uniform_engine():
    return scheduler.Engine(uniform_params(TINY), TINY, TOK, dtype=F32)


PROMPT = [SP["<|bos|>"], *TOK.encode("hi")]


def test_rows_sample_independently(uniform_engine):
    col, _ = next(uniform_engine.generate(PROMPT, num_samples=16, max_tokens=1, temperature=1.0))
    assert len(set(col)) > 1


def test_same_seed_same_output(uniform_engine):
    a = uniform_engine.generate_batch(PROMPT, num_samples=2, max_tokens=16, seed=7)
    b = uniform_engine.generate_batch(PROMPT, num_samples=2, max_tokens=16, seed=7)
    assert a == b


def test_temperature_zero_ignores_seed(uniform_engine):
    outs = {str(uniform_engine.generate_batch(PROMPT, max_tokens=8, temperature=0.0, seed=s)[0]) for s in (1, 2, 3)}
    assert len(outs) == 1


@pytest.mark.parametrize("max_tokens", [1, 4, 16, 64])
def test_length_within_max_tokens(uniform_engine, max_tokens):
    for c in uniform_engine.complete(PROMPT, num_samples=2, max_tokens=max_tokens):
        assert len(c.tokens) <= max_tokens
        assert c.finish_reason == "length" or len(c.tokens) < max_tokens


@pytest.mark.parametrize("n", [1, 2, 16])  # slot counts other tests compile too
def test_num_samples(uniform_engine, n):
    results, masks = uniform_engine.generate_batch(PROMPT, num_samples=n, max_tokens=4)
    assert len(results) == len(masks) == n
    assert all(r[:len(PROMPT)] == PROMPT and m[:len(PROMPT)] == [0] * len(PROMPT) for r, m in zip(results, masks))


def test_different_seeds_differ(uniform_engine):
    a = uniform_engine.generate_batch(PROMPT, max_tokens=16, seed=1)
    b = uniform_engine.generate_batch(PROMPT, max_tokens=16, seed=2)
    assert a != b


def test_steps_per_call_gives_the_same_tokens():
    """generate_steps (N tokens per call) equals N generate_step calls: sampling, n rows, and
    the calculator, whose <|python_end|> pauses the row until the host forces the result."""
    params = random_params(TINY, seed=4)
    one, many = (scheduler.Engine(params, TINY, TOK, dtype=F32, steps_per_call=k) for k in (1, 3))
    for kw in (dict(temperature=1.0, top_k=20, top_p=0.9, seed=3), dict(temperature=0.7, seed=5),
               dict(temperature=0.0)):  # two rows, a 128 cache: the shapes the tests above compiled
        assert many.generate_batch(PROMPT, num_samples=2, max_tokens=20, **kw) == \
            one.generate_batch(PROMPT, num_samples=2, max_tokens=20, **kw)
    for expr, result in (("2+3", "5"), ("12+3", "15"), ("12+30", "42")):  # <|python_end|> at each step of a call
        tool = bigram_params(TINY, _tool_chain(expr))
        want, got = (scheduler.Engine(tool, TINY, TOK, dtype=F32, steps_per_call=k).complete(
            [SP["<|bos|>"]], num_samples=2, max_tokens=20, temperature=0.0) for k in (1, 3))
        assert TOK.decode(got[0].tokens) == expr + result
        assert got == want and got[0].masks == [1] * (len(expr) + 2) + [0] * (len(result) + 2)


# ---- stop / length and the calculator (scripted bigram model) -----------------------------------

def test_stop_and_length_finish_reasons():
    chain = {SP["<|bos|>"]: B("h"), B("h"): B("i"), B("i"): SP["<|assistant_end|>"]}
    eng = scheduler.Engine(bigram_params(TINY, chain), TINY, TOK, dtype=F32)
    (c,) = eng.complete([SP["<|bos|>"]], max_tokens=10, temperature=0.0)
    assert (c.tokens, c.masks, c.finish_reason) == ([B("h"), B("i")], [1, 1], "stop")
    (c,) = eng.complete([SP["<|bos|>"]], max_tokens=1, temperature=0.0)
    assert (c.tokens, c.finish_reason) == ([B("h")], "length")
    results, masks = eng.generate_batch([SP["<|bos|>"]], num_samples=2, max_tokens=10, temperature=0.0)
    assert results == [[SP["<|bos|>"], B("h"), B("i")]] * 2 and masks == [[0, 1, 1]] * 2


def test_calculator_forces_output():
    eng = scheduler.Engine(bigram_params(TINY, _tool_chain("2+3")), TINY, TOK, dtype=F32)
    (c,) = eng.complete([SP["<|bos|>"]], max_tokens=20, temperature=0.0)
    call = [SP["<|python_start|>"], B("2"), B("+"), B("3"), SP["<|python_end|>"]]
    assert c.tokens == call + [SP["<|output_start|>"], B("5"), SP["<|output_end|>"]]
    assert c.masks == [1] * 5 + [0] * 3
    assert c.finish_reason == "stop"


def test_calculator_refuses_unsafe_call():
    """`open()` is refused: nothing is forced and the model's own token follows <|python_end|>."""
    eng = scheduler.Engine(bigram_params(TINY, _tool_chain("open()")), TINY, TOK, dtype=F32)
    (c,) = eng.complete([SP["<|bos|>"]], max_tokens=20, temperature=0.0)
    assert c.tokens[-2:] == [SP["<|python_end|>"], B("x")] and all(c.masks)


def test_calculator_tool_error_is_no_result(monkeypatch):
    """Any exception in the tool path (the scheduler thread runs it) counts as "no result", as a
    refused call does: nothing is forced and generation goes on."""
    class BadTokenizer:
        def decode(self, ids):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")

    assert scheduler.tool_output([B("2")], SP, BadTokenizer()) == []
    monkeypatch.setattr(scheduler, "use_calculator", lambda expr: 1 / 0)
    assert scheduler.tool_output([B("2")], SP, TOK) == []
    # the per-row state machine the Engine and the serving scheduler drive: the call ends cleanly
    row = scheduler._ToolRow()
    for token in [SP["<|python_start|>"], *TOK.encode("2+3"), SP["<|python_end|>"]]:
        row.see(token, SP, TOK)
    assert not row.in_python and list(row.forced) == []
    monkeypatch.undo()
    for token in [SP["<|python_start|>"], *TOK.encode("2+3"), SP["<|python_end|>"]]:
        row.see(token, SP, TOK)
    assert TOK.decode(list(row.forced)[1:-1]) == "5"  # and the next call works as usual


@pytest.mark.parametrize("expr,want", [
    ("2+3", 5), ("0.2*50", 10.0), ("1,000 * 2", 2000), ("(7 - 1) / 4", 1.5), ("-3+1", -2), ("7//2", 3),
    ("'strawberry'.count('r')", 3), ('"banana".count("an")', 2),
])
def test_use_calculator(expr, want):
    assert scheduler.use_calculator(expr) == want


@pytest.mark.parametrize("expr", [
    "2**10", "1/0", "9" * 400 + "*" + "9" * 400 + "*" + "9" * 400 + "*" + "9" * 400, "__import__('os')",
    "().__class__", "open('f').count('a')", "'a'.count('a')+1", "x.count('a')", "'a'.count(x)", "exit()", "",
    "'a'.upper().count('A')",
])
def test_use_calculator_refuses(expr):
    assert scheduler.use_calculator(expr) is None
