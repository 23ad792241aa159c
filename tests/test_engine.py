"""KV-cache engine: cached decode equals the full forward, and upstream's Engine behaviours (docs/numerics.md#generation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat_jax import engine, model
from nanochat_jax.config import GPTConfig
from nanochat_jax.tokenizer import SPECIAL_TOKENS

F32 = jnp.float32
full_forward = jax.jit(model.forward, static_argnames=("config", "dtype"))


class ByteTokenizer:
    """Upstream's test tokenizer: ids 0-255 are bytes, the 9 specials follow."""

    vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode_special(self, s):
        return 256 + SPECIAL_TOKENS.index(s)

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


TOK = ByteTokenizer()
SP = {s: TOK.encode_special(s) for s in SPECIAL_TOKENS}
TINY = GPTConfig(sequence_len=128, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                 window_pattern="L")


def random_params(config, seed=0):
    """Init params with every matrix and scalar perturbed, so smear, blocks and backout all matter."""
    params = model.init_params(config, jax.random.key(seed), F32)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: np.asarray(a) + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), params)
    params["smear_lambda"] = np.full((1,), 0.7, np.float32)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 10  # wide top-2 gaps for greedy parity
    return jax.tree.map(jnp.asarray, params)


def uniform_params(config):
    """A zero lm_head gives uniform logits: upstream's mock model."""
    params = model.init_params(config, jax.random.key(0), F32)
    params["lm_head"]["kernel"] = jnp.zeros_like(params["lm_head"]["kernel"])
    return params


def bigram_params(config, chain):
    """A scripted model: at init the blocks add nothing (zero c_proj, zero smear), so with
    one-hot embeddings the logits depend only on the current token and `chain` picks
    the greedy successor."""
    params = model.init_params(config, jax.random.key(0), F32)
    C, Vp = config.n_embd, config.padded_vocab_size
    params["wte"] = jnp.asarray(np.eye(C, dtype=np.float32)[np.arange(Vp) % C])
    lm = np.zeros((C, Vp), np.float32)
    for a, b in chain.items():
        lm[a % C, b] = 1.0
    params["lm_head"]["kernel"] = jnp.asarray(lm)
    return params


# ---- cached forward == full forward ---------------------------------------------------------

CONFIGS = [
    # (config, prompt lengths of the two rows, decode chunk)
    (GPTConfig(sequence_len=256, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL"),
     (37, 50), 1),
    (GPTConfig(sequence_len=256, vocab_size=300, n_layer=4, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSL"),
     (100, 120), 1),
    (GPTConfig(sequence_len=256, vocab_size=300, n_layer=2, n_head=4, n_kv_head=1, n_embd=64, window_pattern="S"),
     (20, 30), 7),
]


@pytest.mark.parametrize("config,prompts,chunk", CONFIGS)
def test_cached_decode_matches_forward(config, prompts, chunk):
    """Two slots at different lengths, prefilled through bucket padding and insert, then
    decoded (token by token or in chunks) past the short window: every position's logits
    equal the full-sequence forward's."""
    T_total, max_len = 160, 256
    params = random_params(config)
    rng = np.random.default_rng(1)
    seqs = rng.integers(0, config.vocab_size, (2, T_total)).astype(np.int32)
    ref = np.asarray(full_forward(params, jnp.asarray(seqs), config=config, dtype=F32))
    state = engine.init_state(config, 2, max_len, [0], F32)
    for slot, P in enumerate(prompts):
        T = engine.bucket_length(P, max_len)
        padded = jnp.asarray(np.pad(seqs[slot:slot + 1, :P], ((0, 0), (0, T - P))))
        prefix = engine.prefill(params, padded, P, config=config, dtype=F32)
        np.testing.assert_allclose(prefix.logits_V, ref[slot, P - 1], rtol=1e-5, atol=1e-5)
        state = engine.insert(state, prefix, slot, jax.random.key_data(jax.random.key(0)), 0.0, 0, 1.0, max_len)
    step = jax.jit(model.forward, static_argnames=("config", "dtype"))
    k, v, prev = state.k_cache, state.v_cache, state.prev_SC
    lengths = np.array(prompts)
    while lengths.min() < T_total:
        n_new = np.minimum(chunk, T_total - lengths)
        idx = np.minimum(lengths[:, None] + np.arange(chunk)[None], T_total - 1)
        chunk_tokens = np.take_along_axis(seqs, idx, axis=1)
        cache = model.KVCache(k, v, jnp.asarray(lengths, jnp.int32), prev)
        logits, (k, v, new_lengths, prev) = step(params, jnp.asarray(chunk_tokens), config=config, dtype=F32,
                                                  cache=cache, n_new_B=jnp.asarray(n_new, jnp.int32))
        np.testing.assert_array_equal(new_lengths, lengths + n_new)
        logits = np.asarray(logits)
        for r in range(2):
            want = ref[r, lengths[r]:lengths[r] + n_new[r]]
            np.testing.assert_allclose(logits[r, :n_new[r]], want, rtol=1e-5, atol=1e-5)
        lengths = lengths + n_new


def test_greedy_engine_matches_model_generate():
    config = GPTConfig(sequence_len=128, vocab_size=TOK.vocab_size, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                       window_pattern="SL")
    params = random_params(config, seed=3)
    prompt = [SP["<|bos|>"], *TOK.encode("hello there")]
    want = list(model.generate(params, prompt, config, 24, temperature=0.0, dtype=F32))
    eng = engine.Engine(params, config, TOK, dtype=F32)
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
    eng = engine.Engine(params, config, TOK, dtype=F32, steps_per_call=steps)
    got = [col[0] for col, _ in eng.generate(prompt, max_tokens=new, temperature=0.0)]
    stops = [i for i, t in enumerate(want) if t in eng.stop_ids]
    assert got == want[:stops[0] + 1 if stops else new]


# ---- upstream's Engine behaviours (uniform mock model) -------------------------------------------

@pytest.fixture(scope="module")
def uniform_engine():
    return engine.Engine(uniform_params(TINY), TINY, TOK, dtype=F32)


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


# ---- sampling ----------------------------------------------------------------------------------

def _draws(logits, temperature, top_k, top_p, n=2000):
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), n))
    rows = jnp.broadcast_to(jnp.asarray(logits, F32), (n, len(logits)))
    full = lambda x, dt: jnp.full((n,), x, dt)  # noqa: E731
    return set(np.asarray(engine.sample_logits(rows, keys, full(temperature, F32), full(top_k, jnp.int32),
                                               full(top_p, F32))).tolist())


def test_sampling_filters():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert _draws(logits, 1.0, 0, 1.0) == {0, 1, 2, 3}
    assert _draws(logits, 1.0, 2, 1.0) == {0, 1}
    assert _draws(logits, 1.0, 0, 0.7) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert _draws(logits, 1.0, 0, 0.4) == {0}
    assert _draws(logits, 0.0, 0, 1.0) == {0}


def test_sampler_branches_agree_per_row():
    """The batch picks the sampler (none, plain, lax.top_k, full sort) but a row's token must
    not depend on its neighbours: rows 0-2 draw the same with any row 3 beside them."""
    V, n = 400, 64
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((n, 4, V)) * 3, F32)
    keys = jax.random.key_data(jax.random.split(jax.random.key(1), n * 4)).reshape(n, 4, -1)
    rows = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 7, 1.0)]  # greedy, plain, top-k
    draw = jax.jit(jax.vmap(engine.sample_logits))
    outs = []
    for fourth in [(0.0, 0, 1.0), (1.0, 0, 1.0), (1.0, 50, 1.0), (1.0, 0, 0.9), (1.0, 300, 1.0)]:
        t, k, p = (jnp.asarray(np.broadcast_to(np.array(c, dt), (n, 4))) for c, dt in
                   zip(zip(*rows, fourth), (np.float32, np.int32, np.float32)))
        outs.append(np.asarray(draw(logits, keys, t, k, p))[:, :3])
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    assert len(set(outs[0][:, 1].tolist())) > 10  # and the plain row really samples


def test_steps_per_call_gives_the_same_tokens():
    """generate_steps (N tokens per call) equals N generate_step calls: sampling, n rows, and
    the calculator, whose <|python_end|> pauses the row until the host forces the result."""
    params = random_params(TINY, seed=4)
    one, many = (engine.Engine(params, TINY, TOK, dtype=F32, steps_per_call=k) for k in (1, 3))
    for kw in (dict(temperature=1.0, top_k=20, top_p=0.9, seed=3), dict(temperature=0.7, seed=5),
               dict(temperature=0.0)):  # two rows, a 128 cache: the shapes the tests above compiled
        assert many.generate_batch(PROMPT, num_samples=2, max_tokens=20, **kw) == \
            one.generate_batch(PROMPT, num_samples=2, max_tokens=20, **kw)
    for expr, result in (("2+3", "5"), ("12+3", "15"), ("12+30", "42")):  # <|python_end|> at each step of a call
        tool = bigram_params(TINY, _tool_chain(expr))
        want, got = (engine.Engine(tool, TINY, TOK, dtype=F32, steps_per_call=k).complete(
            [SP["<|bos|>"]], num_samples=2, max_tokens=20, temperature=0.0) for k in (1, 3))
        assert TOK.decode(got[0].tokens) == expr + result
        assert got == want and got[0].masks == [1] * (len(expr) + 2) + [0] * (len(result) + 2)


# ---- stop / length and the calculator (scripted bigram model) -----------------------------------

B = lambda s: TOK.encode(s)[0]  # noqa: E731


def test_stop_and_length_finish_reasons():
    chain = {SP["<|bos|>"]: B("h"), B("h"): B("i"), B("i"): SP["<|assistant_end|>"]}
    eng = engine.Engine(bigram_params(TINY, chain), TINY, TOK, dtype=F32)
    (c,) = eng.complete([SP["<|bos|>"]], max_tokens=10, temperature=0.0)
    assert (c.tokens, c.masks, c.finish_reason) == ([B("h"), B("i")], [1, 1], "stop")
    (c,) = eng.complete([SP["<|bos|>"]], max_tokens=1, temperature=0.0)
    assert (c.tokens, c.finish_reason) == ([B("h")], "length")
    results, masks = eng.generate_batch([SP["<|bos|>"]], num_samples=2, max_tokens=10, temperature=0.0)
    assert results == [[SP["<|bos|>"], B("h"), B("i")]] * 2 and masks == [[0, 1, 1]] * 2


def _tool_chain(expr):
    ids = [SP["<|bos|>"], SP["<|python_start|>"], *TOK.encode(expr), SP["<|python_end|>"], B("x")]
    chain = dict(zip(ids[:-1], ids[1:]))
    chain.update({SP["<|output_start|>"]: B("y"), B("5"): B("z"), SP["<|output_end|>"]: SP["<|assistant_end|>"],
                  B("x"): SP["<|assistant_end|>"]})
    return chain


def test_calculator_forces_output():
    eng = engine.Engine(bigram_params(TINY, _tool_chain("2+3")), TINY, TOK, dtype=F32)
    (c,) = eng.complete([SP["<|bos|>"]], max_tokens=20, temperature=0.0)
    call = [SP["<|python_start|>"], B("2"), B("+"), B("3"), SP["<|python_end|>"]]
    assert c.tokens == call + [SP["<|output_start|>"], B("5"), SP["<|output_end|>"]]
    assert c.masks == [1] * 5 + [0] * 3
    assert c.finish_reason == "stop"


def test_calculator_refuses_unsafe_call():
    """`open()` is refused: nothing is forced and the model's own token follows <|python_end|>."""
    eng = engine.Engine(bigram_params(TINY, _tool_chain("open()")), TINY, TOK, dtype=F32)
    (c,) = eng.complete([SP["<|bos|>"]], max_tokens=20, temperature=0.0)
    assert c.tokens[-2:] == [SP["<|python_end|>"], B("x")] and all(c.masks)


def test_calculator_tool_error_is_no_result(monkeypatch):
    """Any exception in the tool path (the scheduler thread runs it) counts as "no result", as a
    refused call does: nothing is forced and generation goes on."""
    class BadTokenizer:
        def decode(self, ids):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")

    assert engine.tool_output([B("2")], SP, BadTokenizer()) == []
    monkeypatch.setattr(engine, "use_calculator", lambda expr: 1 / 0)
    assert engine.tool_output([B("2")], SP, TOK) == []
    # the per-row state machine the Engine and the serving scheduler drive: the call ends cleanly
    row = engine._ToolRow()
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
    assert engine.use_calculator(expr) == want


@pytest.mark.parametrize("expr", [
    "2**10", "1/0", "9" * 400 + "*" + "9" * 400 + "*" + "9" * 400 + "*" + "9" * 400, "__import__('os')",
    "().__class__", "open('f').count('a')", "'a'.count('a')+1", "x.count('a')", "'a'.count(x)", "exit()", "",
    "'a'.upper().count('A')",
])
def test_use_calculator_refuses(expr):
    assert engine.use_calculator(expr) is None


# ---- continuous batching -----------------------------------------------------------------------

def test_insert_does_not_disturb_other_slots():
    """A request's tokens are the same alone or with another request inserted mid-flight."""
    config = GPTConfig(sequence_len=128, vocab_size=TOK.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       window_pattern="L")
    params = random_params(config, seed=5)
    max_len, steps = 128, 12
    reqs = [  # (prompt, temperature, top_k, top_p, seed)
        ([SP["<|bos|>"], *TOK.encode("the cat")], 1.0, 40, 0.9, 11),
        ([SP["<|bos|>"], *TOK.encode("a longer prompt")], 0.0, 0, 1.0, 12),
    ]

    def admit(state, slot):
        prompt, temperature, top_k, top_p, seed = reqs[slot]
        T = engine.bucket_length(len(prompt), max_len)
        prefix = engine.prefill(params, jnp.asarray([prompt + [0] * (T - len(prompt))], jnp.int32), len(prompt),
                                config=config, dtype=F32)
        state = engine.insert(state, prefix, slot, jax.random.key_data(jax.random.key(seed)), temperature, top_k,
                              top_p, 100)
        return state, [int(state.last_token_S[slot])]

    def step(state, outs):
        state, tokens, _ = engine.generate_step(state, params, jnp.full((2,), -1, jnp.int32), config=config, dtype=F32)
        for slot, out in outs.items():
            out.append(int(tokens[slot]))
        return state

    alone = []
    for slot in range(2):
        state, out = admit(engine.init_state(config, 2, max_len, [-1], F32), slot)
        for _ in range(steps):
            state = step(state, {slot: out})
        alone.append(out)

    state, a = admit(engine.init_state(config, 2, max_len, [-1], F32), 0)
    for _ in range(5):
        state = step(state, {0: a})
    state, b = admit(state, 1)
    for _ in range(steps - 5):
        state = step(state, {0: a, 1: b})
    for _ in range(5):
        state = step(state, {1: b})
    assert a == alone[0] and b == alone[1]


# ---- OpenAI's logit processing and logprobs ------------------------------------------------------

def test_process_logits_and_logprobs_match_numpy():
    """logit_bias, presence/frequency penalties and the logprob/top-k report, against numpy."""
    rng = np.random.default_rng(7)
    S, V = 3, 50
    logits = rng.standard_normal((S, V)).astype(np.float32) * 3
    bias = np.zeros((S, V), np.float32)
    bias[0, 4], bias[1, 9], bias[2, 0] = 5.0, -100.0, 2.5
    counts = rng.integers(0, 3, (S, V)).astype(np.int32)
    presence, frequency = np.array([0.5, 0.0, -1.0], np.float32), np.array([0.25, 1.5, 0.0], np.float32)
    got = np.asarray(engine.process_logits(*map(jnp.asarray, (logits, bias, counts, presence, frequency))))
    want = logits + bias - presence[:, None] * (counts > 0) - frequency[:, None] * counts
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)

    token = np.array([3, 9, 17], np.int32)
    lp, ids, vals = (np.asarray(a) for a in engine.token_logprobs(jnp.asarray(want), jnp.asarray(token),
                                                                   jnp.array([True, False, True])))
    lsm = want - np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1, keepdims=True)) - want.max(-1, keepdims=True)
    np.testing.assert_allclose(lp, lsm[np.arange(S), token], atol=1e-5)
    np.testing.assert_array_equal(ids, np.argsort(-lsm, axis=-1, kind="stable")[:, :engine.TOP_LOGPROBS])
    np.testing.assert_allclose(vals, np.sort(lsm, axis=-1)[:, ::-1][:, :engine.TOP_LOGPROBS], atol=1e-5)
    skipped = engine.token_logprobs(jnp.asarray(want), jnp.asarray(token), jnp.zeros(S, bool))
    assert all(not np.asarray(a).any() for a in skipped)  # nobody asked: the softmax is skipped


def test_frequency_penalty_breaks_a_greedy_loop():
    """A scripted 'ab' loop: the greedy reply leaves the loop once the frequency penalty on a
    repeated token exceeds the model's margin, and insert resets the counts per request."""
    chain = {SP["<|bos|>"]: B("a"), B("a"): B("b"), B("b"): B("a")}
    eng = engine.Engine(bigram_params(TINY, chain), TINY, TOK, dtype=F32)
    params, F = eng.params, eng.dtype
    # two slots, a 128 cache and the Engine's own params and stop ids: what the Engine tests compiled
    state = engine.init_state(TINY, 2, 128, eng.stop_ids, F)
    prefix = eng.prefill([SP["<|bos|>"]], 128)

    def run(state, frequency):
        state = engine.insert(state, prefix, 0, jax.random.key_data(jax.random.key(0)), 0.0, 0, 1.0, 20,
                              None, 0.0, frequency)
        out = [int(state.last_token_S[0])]
        for _ in range(9):
            state, tokens, _ = engine.generate_step(state, params, jnp.full((2,), -1, jnp.int32), config=TINY,
                                                    dtype=F)
            out.append(int(tokens[0]))
        return state, out

    state, plain = run(state, 0.0)
    assert plain == [B("a"), B("b")] * 5
    # the chain's margin is 8 logits and each earlier use costs 2: 'a' loses it after its 4th use
    state, penalised = run(state, 2.0)
    assert penalised[:8] == plain[:8] and penalised[8] != B("a")
    _, again = run(state, 0.0)
    assert again == plain  # the counts of the previous request do not leak into the slot's next one
