"""KV-cache engine's jitted core: cached decode equals the full forward, sampling, slots, logit processing
(docs/numerics.md#generation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


B = lambda s: TOK.encode(s)[0]  # noqa: E731


def _tool_chain(expr):
    ids = [SP["<|bos|>"], SP["<|python_start|>"], *TOK.encode(expr), SP["<|python_end|>"], B("x")]
    chain = dict(zip(ids[:-1], ids[1:]))
    chain.update({SP["<|output_start|>"]: B("y"), B("5"): B("z"), SP["<|output_end|>"]: SP["<|assistant_end|>"],
                  B("x"): SP["<|assistant_end|>"]})
    return chain


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



@pytest.mark.parametrize("slots", [1, 8])
def test_decode_does_not_copy_the_cache(slots):
    """generate_step and generate_steps update each layer's cache in place: the compiled step
    holds no cache-sized copy (attention reading the freshly written cache made XLA:CPU copy
    every layer's buffer at one row; reading the old one unordered with the write, at 8 rows)."""
    state = engine.init_state(TINY, slots, 128, [0], F32)
    params = model.init_params(TINY, jax.random.key(0), F32)
    cache = f"f32[{slots},{TINY.n_kv_head},128,{TINY.head_dim}]"
    forced_S, forced_NS = jnp.full((slots,), -1, jnp.int32), jnp.full((4, slots), -1, jnp.int32)
    for lowered in (engine.generate_step.lower(state, params, forced_S, config=TINY, dtype=F32),
                    engine.generate_steps.lower(state, params, forced_NS, 0, config=TINY, dtype=F32)):
        hlo = lowered.compile().as_text()
        copies = [line for line in hlo.splitlines()
                  if " copy(" in line and line.split(" copy(")[0].split("= ")[-1].startswith(cache)]
        assert not copies, copies[:2]

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
    params, F = bigram_params(TINY, chain), F32
    # two slots, a 128 cache and the Engine's stop ids: what the Engine tests compile
    state = engine.init_state(TINY, 2, 128, (SP["<|assistant_end|>"], SP["<|bos|>"]), F)
    prefix = engine.prefill(params, jnp.asarray([[SP["<|bos|>"]] + [0] * 15], jnp.int32), 1, config=TINY, dtype=F)

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
