"""KV-cache inference (docs/numerics.md#generation): jitted prefill / insert / generate_step.

The serving shape is the one JAX serving stacks use (JetStream's): a prompt is prefilled once at batch 1,
padded to a length bucket so only a few shapes ever compile; the result is inserted into
one row ("slot") of a fixed-size decode state; each generate_step advances every running
slot by one token and samples on device. Each slot carries its own length, RNG key and
sampling parameters, so requests of different ages share one step (continuous batching),
and a request's tokens do not depend on what runs in the other slots.

Prefill and decode run `model.forward` with a KV cache (model.KVCache): the one forward,
reading and writing k/v at per-slot positions.

The jitted core never sees a tokenizer: the host loop (scheduler.py) owns the calculator tool
and forces its output into a row.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nanochat_jax.common import resolve_dtype
from nanochat_jax.config import GPTConfig
from nanochat_jax.model import KVCache, forward

RUNNING, STOP, LENGTH, FREE = 0, 1, 2, 3  # per-slot finish codes
FINISH_REASONS = {STOP: "stop", LENGTH: "length"}
MIN_BUCKET = 16


class DecodeState(NamedTuple):
    """Everything a decode step needs, one row per slot (a pytree, donated across steps).

    `last_token_S` is the newest token of each slot: already reported to the host, not
    yet in the cache (the next step feeds it). `lengths_S` counts cached tokens.
    """

    k_cache: tuple[jax.Array, ...]  # model.KVCache's layout: per layer (slot, kv head, position, head dim)
    v_cache: tuple[jax.Array, ...]
    lengths_S: jax.Array  # int32, tokens in the cache
    limit_S: jax.Array  # int32, total tokens (prompt + generated) the slot may reach
    prev_SC: jax.Array  # normalized pre-smear embedding of the last cached token
    last_token_S: jax.Array  # int32
    finish_S: jax.Array  # int32: RUNNING, STOP, LENGTH or FREE
    keys_SK: jax.Array  # raw PRNG key data per slot
    temperature_S: jax.Array  # 0 = greedy
    top_k_S: jax.Array  # int32, 0 = off
    top_p_S: jax.Array  # 1 = off
    stop_ids_N: jax.Array  # int32 ids that end a row (<|assistant_end|>, <|bos|>)
    # OpenAI's logit processing, applied before temperature and the filters:
    # logits + bias - presence * [count > 0] - frequency * count, counting generated tokens.
    bias_SV: jax.Array  # fp32 logit_bias, dense over the vocabulary
    counts_SV: jax.Array  # int32 times each token was generated in the slot
    presence_S: jax.Array  # fp32 presence_penalty
    frequency_S: jax.Array  # fp32 frequency_penalty
    adjust_S: jax.Array  # bool: the slot has a bias or a penalty (else the processing is skipped)
    # Log-probabilities of the newest token under the processed (pre-temperature) distribution,
    # and the TOP_LOGPROBS best alternatives (computed only while some slot asks for them).
    logprob_S: jax.Array  # fp32
    top_ids_SL: jax.Array  # int32
    top_lp_SL: jax.Array  # fp32
    want_lp_S: jax.Array  # bool: this slot reports logprobs


class Prefix(NamedTuple):
    """A prefilled prompt: a one-row cache of bucket length and its next-token logits."""

    k_cache: tuple[jax.Array, ...]  # per layer (1, kv head, bucket length, head dim)
    v_cache: tuple[jax.Array, ...]
    length: jax.Array  # int32 scalar, the true prompt length
    prev_C: jax.Array
    logits_V: jax.Array  # fp32 logits after the last prompt token


# ---- sampling -------------------------------------------------------------------------------

TOP_K_FAST = 256  # top-k up to this many is found with lax.top_k instead of a full-vocab sort


def _draw(scaled_SV, keys_SK):
    """One categorical draw per row by inverting the CDF with the row's own uniform.

    One random number per row instead of a Gumbel per vocabulary entry: on CPU the
    V-wide noise cost more than the whole decode forward. -inf entries have probability
    0 and are never drawn (u > 0).
    """
    u_S = jax.vmap(lambda k: jax.random.uniform(jax.random.wrap_key_data(k), minval=jnp.finfo(jnp.float32).tiny))(
        keys_SK)
    cdf_SV = jnp.cumsum(jax.nn.softmax(scaled_SV, axis=-1), axis=-1)
    idx_S = jnp.sum(cdf_SV < (u_S * cdf_SV[:, -1])[:, None], axis=-1)
    return jnp.minimum(idx_S, scaled_SV.shape[-1] - 1).astype(jnp.int32)


def _filtered(logits_SV, kth_S1, temperature_S, top_p_S, sorted_SV):
    """Top-k (entries below kth_S1 dropped), then top-p over the tempered distribution.

    sorted_SV holds each row's largest logits in descending order, at least top_k of them
    (all V when top-p must see the whole distribution); top_p 1 drops nothing.
    """
    t_S1 = jnp.where(temperature_S > 0, temperature_S, 1.0)[:, None]
    scaled_SV = jnp.where(logits_SV < kth_S1, -jnp.inf, logits_SV / t_S1)
    sorted_scaled_SV = jnp.where(sorted_SV < kth_S1, -jnp.inf, sorted_SV / t_S1)
    probs_SV = jax.nn.softmax(sorted_scaled_SV, axis=-1)
    keep_SV = jnp.cumsum(probs_SV, axis=-1) - probs_SV < top_p_S[:, None]  # the smallest set with mass >= p
    cutoff_S1 = jnp.min(jnp.where(keep_SV, sorted_scaled_SV, jnp.inf), axis=-1, keepdims=True)
    cutoff_S1 = jnp.where(top_p_S[:, None] >= 1, -jnp.inf, cutoff_S1)
    return jnp.where(scaled_SV < cutoff_S1, -jnp.inf, scaled_SV)


def _argmax(logits_SV):
    """jnp.argmax (first maximum) as two plain reductions: XLA:CPU runs its (value, index)
    reduce 4-6x slower than a max and a min over the 32k vocabulary."""
    V = logits_SV.shape[-1]
    best_S1 = jnp.max(logits_SV, axis=-1, keepdims=True)
    idx_S = jnp.min(jnp.where(logits_SV == best_S1, jnp.arange(V, dtype=jnp.int32), V - 1), axis=-1)
    return idx_S.astype(jnp.int32)


def sample_logits(logits_SV, keys_SK, temperature_S, top_k_S, top_p_S):
    """One token per row: temperature 0 = argmax; else top-k (0 = off), then top-p (1 = off)
    over the tempered distribution, then a categorical draw with the row's own key.

    The work is picked per batch (lax.switch): argmax only when every row is greedy, no
    sort when no row filters, lax.top_k when every filter is a top-k <= TOP_K_FAST
    without top-p, else a full-vocab sort. Every branch feeds a row's draw the same
    tempered, filtered logits and the same uniform, so a row's token does not depend on
    the other rows (top_p = 1 cuts nothing, so top-k rows agree between the last two).
    """
    V = logits_SV.shape[-1]
    greedy_S = _argmax(logits_SV)
    sampling_S = temperature_S > 0
    t_S1 = jnp.where(sampling_S, temperature_S, 1.0)[:, None]
    k_fast = min(TOP_K_FAST, V)
    k_S = jnp.where(top_k_S > 0, jnp.clip(top_k_S, 1, V), V)

    def plain():
        return _draw(logits_SV / t_S1, keys_SK)

    def top_k_only():  # top_p is 1 everywhere and k <= k_fast where k < V
        top_SK = jax.lax.top_k(logits_SV, k_fast)[0]
        kth_S1 = jnp.where((k_S <= k_fast)[:, None],
                           jnp.take_along_axis(top_SK, (jnp.minimum(k_S, k_fast) - 1)[:, None], axis=-1), -jnp.inf)
        return _draw(_filtered(logits_SV, kth_S1, temperature_S, top_p_S, top_SK), keys_SK)

    def full():
        sorted_SV = -jnp.sort(-logits_SV, axis=-1)
        kth_S1 = jnp.take_along_axis(sorted_SV, (k_S - 1)[:, None], axis=-1)
        return _draw(_filtered(logits_SV, kth_S1, temperature_S, top_p_S, sorted_SV), keys_SK)

    filters_S = sampling_S & (k_S < V)
    needs_sort = jnp.any(sampling_S & ((top_p_S < 1) | ((k_S > k_fast) & (k_S < V))))
    branch = jnp.where(~jnp.any(sampling_S), 0, jnp.where(needs_sort, 3, jnp.where(jnp.any(filters_S), 2, 1)))
    sampled_S = jax.lax.switch(branch, [lambda: greedy_S, plain, top_k_only, full])
    return jnp.where(sampling_S, sampled_S, greedy_S)


TOP_LOGPROBS = 20  # OpenAI's top_logprobs limit


def process_logits(logits_SV, bias_SV, counts_SV, presence_S, frequency_S):
    """OpenAI's logit_bias and presence/frequency penalties (before temperature)."""
    counts_SV = counts_SV.astype(jnp.float32)
    return (logits_SV + bias_SV - presence_S[:, None] * (counts_SV > 0)
            - frequency_S[:, None] * counts_SV)


def token_logprobs(logits_SV, token_S, want_S):
    """(logprob of token_S, TOP_LOGPROBS best ids, their logprobs) under log_softmax(logits_SV).

    The vocabulary-wide softmax and top-k run only when some row asks (lax.cond); rows
    that do not ask get zeros."""
    S, L = logits_SV.shape[0], min(TOP_LOGPROBS, logits_SV.shape[-1])

    def compute():
        lp_SV = jax.nn.log_softmax(logits_SV, axis=-1)
        vals_SL, ids_SL = jax.lax.top_k(lp_SV, L)
        return jnp.take_along_axis(lp_SV, token_S[:, None], axis=-1)[:, 0], ids_SL.astype(jnp.int32), vals_SL

    def skip():
        return jnp.zeros((S,), jnp.float32), jnp.zeros((S, L), jnp.int32), jnp.zeros((S, L), jnp.float32)

    return jax.lax.cond(jnp.any(want_S), compute, skip)


def _split_keys(keys_SK):
    """(next key, subkey for this draw) per slot, as raw key data."""
    keys = jax.vmap(jax.random.wrap_key_data)(keys_SK)
    nxt, sub = jax.vmap(jax.random.split, out_axes=1)(keys)
    return jax.random.key_data(nxt), jax.random.key_data(sub)


def _finish(token_S, total_S, limit_S, stop_ids_N):
    stop_S = jnp.any(token_S[:, None] == stop_ids_N[None], axis=-1)
    return jnp.where(stop_S, STOP, jnp.where(total_S >= limit_S, LENGTH, RUNNING)).astype(jnp.int32)


# ---- the jitted core: init_state / prefill / insert / generate_step ----------------------------

def init_state(config: GPTConfig, slots: int, max_len: int, stop_ids, dtype=None) -> DecodeState:
    """An empty decode state: `slots` free rows of a `max_len`-token cache."""
    cd = resolve_dtype(dtype)
    cache = lambda: tuple(jnp.zeros((slots, config.n_kv_head, max_len, config.head_dim), cd)  # noqa: E731
                          for _ in range(config.n_layer))
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    zeros_i = lambda: jnp.zeros((slots,), jnp.int32)  # noqa: E731  (fresh buffers: the state is donated)
    zeros_f = lambda *shape: jnp.zeros((slots, *shape), jnp.float32)  # noqa: E731
    V, L = config.vocab_size, min(TOP_LOGPROBS, config.vocab_size)
    return DecodeState(
        k_cache=cache(), v_cache=cache(), lengths_S=zeros_i(), limit_S=zeros_i(),
        prev_SC=jnp.zeros((slots, config.n_embd), cd), last_token_S=zeros_i(),
        finish_S=jnp.full((slots,), FREE, jnp.int32), keys_SK=jnp.zeros((slots, *key_shape), jnp.uint32),
        temperature_S=jnp.zeros((slots,), jnp.float32), top_k_S=zeros_i(), top_p_S=jnp.ones((slots,), jnp.float32),
        stop_ids_N=jnp.asarray(stop_ids, jnp.int32).reshape(-1),
        bias_SV=zeros_f(V), counts_SV=jnp.zeros((slots, V), jnp.int32), presence_S=zeros_f(), frequency_S=zeros_f(),
        adjust_S=jnp.zeros((slots,), bool),
        logprob_S=zeros_f(), top_ids_SL=jnp.zeros((slots, L), jnp.int32), top_lp_SL=zeros_f(L),
        want_lp_S=jnp.zeros((slots,), bool))


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def prefill(params, tokens_1T, length, *, config: GPTConfig, dtype=None) -> Prefix:
    """Prefill one prompt padded to a bucket length T (one compile per bucket)."""
    cd = resolve_dtype(dtype)
    T = tokens_1T.shape[1]
    cache = (jnp.zeros((1, config.n_kv_head, T, config.head_dim), cd),) * config.n_layer
    length = jnp.asarray(length, jnp.int32)
    empty = KVCache(cache, cache, jnp.zeros((1,), jnp.int32), jnp.zeros((1, config.n_embd), cd))
    logits, filled = forward(params, tokens_1T, config, dtype=cd, cache=empty, n_new_B=length[None], last_only=True)
    return Prefix(filled.k, filled.v, length, filled.prev_BC[0], logits[0, 0])


@functools.partial(jax.jit, static_argnames=("total", "config", "dtype"))
def prefill_from(params, cached: Prefix, tokens_1T, n_new, *, total: int, config: GPTConfig, dtype=None) -> Prefix:
    """Prefill the n_new tokens that follow a stored prefix (`cached`, logits unused), into a
    cache of `total` positions (the bucket a cold prefill of the whole prompt would have), so
    insert sees the same shapes (one compile per stored, chunk and total bucket)."""
    cd = resolve_dtype(dtype)
    keep = min(cached.k_cache[0].shape[2], total)
    grow = lambda c: jnp.zeros((1, config.n_kv_head, total, config.head_dim), cd).at[:, :, :keep].set(  # noqa: E731
        c[:, :, :keep].astype(cd))
    n_new = jnp.asarray(n_new, jnp.int32)
    cache = KVCache(tuple(map(grow, cached.k_cache)), tuple(map(grow, cached.v_cache)), cached.length[None],
                    cached.prev_C[None].astype(cd))
    logits, filled = forward(params, tokens_1T, config, dtype=cd, cache=cache, n_new_B=n_new[None], last_only=True)
    return Prefix(filled.k, filled.v, filled.lengths_B[0], filled.prev_BC[0], logits[0, 0])


def bucket_length(n: int, max_len: int) -> int:
    """Prompt buckets: powers of two from MIN_BUCKET, capped at the cache length."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_len)


@functools.partial(jax.jit, donate_argnums=(0,))
def insert(state: DecodeState, prefix: Prefix, slot, key_data, temperature, top_k, top_p, max_tokens,
           bias_V=None, presence=0.0, frequency=0.0, want_logprobs=False) -> DecodeState:
    """Put a prefix into `slot` and sample its first token from the prefill logits.

    The slot's whole cache row is rewritten up to the bucket length; stale entries past it
    sit beyond the slot's length and are overwritten before any query can see them.
    bias_V (None: no bias) is the dense logit_bias; presence/frequency are the penalties
    and want_logprobs asks for each token's logprob and the top alternatives.
    """
    slot = jnp.asarray(slot, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    at = (slot, zero, zero, zero)
    k = tuple(jax.lax.dynamic_update_slice(c, p.astype(c.dtype), at) for c, p in zip(state.k_cache, prefix.k_cache))
    v = tuple(jax.lax.dynamic_update_slice(c, p.astype(c.dtype), at) for c, p in zip(state.v_cache, prefix.v_cache))
    temperature = jnp.asarray(temperature, jnp.float32)[None]
    top_k = jnp.asarray(top_k, jnp.int32)[None]
    top_p = jnp.asarray(top_p, jnp.float32)[None]
    keys_1K, sub_1K = _split_keys(jnp.asarray(key_data, jnp.uint32)[None])
    V = state.bias_SV.shape[1]
    bias_1V = jnp.zeros((1, V), jnp.float32) if bias_V is None else jnp.asarray(bias_V, jnp.float32)[None]
    logits_1V = prefix.logits_V[None] + bias_1V  # nothing generated yet: the penalties are zero
    token = sample_logits(logits_1V, sub_1K, temperature, top_k, top_p)
    want = jnp.asarray(want_logprobs, bool)[None]
    lp, top_ids, top_lp = token_logprobs(logits_1V, token, want)
    limit = jnp.minimum(prefix.length + max_tokens, state.k_cache[0].shape[2])[None].astype(jnp.int32)
    finish = _finish(token, prefix.length[None] + 1, limit, state.stop_ids_N)
    put = lambda a, val: a.at[slot].set(val[0].astype(a.dtype))  # noqa: E731
    return state._replace(
        k_cache=k, v_cache=v, lengths_S=put(state.lengths_S, prefix.length[None]), limit_S=put(state.limit_S, limit),
        prev_SC=put(state.prev_SC, prefix.prev_C[None]), last_token_S=put(state.last_token_S, token),
        finish_S=put(state.finish_S, finish), keys_SK=put(state.keys_SK, keys_1K),
        temperature_S=put(state.temperature_S, temperature), top_k_S=put(state.top_k_S, top_k),
        top_p_S=put(state.top_p_S, top_p), bias_SV=put(state.bias_SV, bias_1V),
        counts_SV=put(state.counts_SV, jnp.zeros((1, V), jnp.int32).at[0, token[0]].add(1)),
        presence_S=put(state.presence_S, jnp.asarray(presence, jnp.float32)[None]),
        frequency_S=put(state.frequency_S, jnp.asarray(frequency, jnp.float32)[None]),
        adjust_S=put(state.adjust_S, (jnp.any(bias_1V != 0) | (jnp.asarray(presence) != 0)
                                      | (jnp.asarray(frequency) != 0))[None]),
        logprob_S=put(state.logprob_S, lp), top_ids_SL=put(state.top_ids_SL, top_ids),
        top_lp_SL=put(state.top_lp_SL, top_lp), want_lp_S=put(state.want_lp_S, want))


def _decode(state: DecodeState, params, forced_S, active_S, config: GPTConfig, dtype):
    """One decode step for the `active_S` slots (a subset of the running ones)."""
    cache = KVCache(state.k_cache, state.v_cache, state.lengths_S, state.prev_SC)
    logits, cache = forward(params, state.last_token_S[:, None], config, dtype=dtype, cache=cache,
                            n_new_B=active_S.astype(jnp.int32))
    keys_SK, sub_SK = _split_keys(state.keys_SK)
    logits_SV = jax.lax.cond(  # vocabulary-wide work only while some running slot needs it
        jnp.any(active_S & state.adjust_S),
        lambda: process_logits(logits[:, 0], state.bias_SV, state.counts_SV, state.presence_S, state.frequency_S),
        lambda: logits[:, 0])
    # Idle rows count as greedy and unfiltered, so they never pull the batch onto a costlier sampler.
    sampled_S = sample_logits(logits_SV, sub_SK, jnp.where(active_S, state.temperature_S, 0.0),
                              jnp.where(active_S, state.top_k_S, 0), jnp.where(active_S, state.top_p_S, 1.0))
    token_S = jnp.where(active_S, jnp.where(forced_S >= 0, forced_S, sampled_S), state.last_token_S)
    lengths_S = cache.lengths_B
    finish_S = jnp.where(active_S, _finish(token_S, lengths_S + 1, state.limit_S, state.stop_ids_N), state.finish_S)
    lp_S, top_ids_SL, top_lp_SL = token_logprobs(logits_SV, token_S, active_S & state.want_lp_S)
    S = token_S.shape[0]
    return state._replace(k_cache=cache.k, v_cache=cache.v, lengths_S=lengths_S, prev_SC=cache.prev_BC,
                          last_token_S=token_S,
                          finish_S=finish_S, keys_SK=jnp.where(active_S[:, None], keys_SK, state.keys_SK),
                          counts_SV=state.counts_SV.at[jnp.arange(S), token_S].add(active_S.astype(jnp.int32)),
                          logprob_S=jnp.where(active_S, lp_S, state.logprob_S),
                          top_ids_SL=jnp.where(active_S[:, None], top_ids_SL, state.top_ids_SL),
                          top_lp_SL=jnp.where(active_S[:, None], top_lp_SL, state.top_lp_SL))


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnums=(0,))
def generate_step(state: DecodeState, params, forced_S, *, config: GPTConfig, dtype=None):
    """Feed every running slot its last token and pick the next one.

    forced_S >= 0 replaces that slot's sample (tool output); the draw still consumes the
    slot's RNG, as upstream. Finished and free slots are left untouched. Returns
    (state, tokens_S, finish_S).
    """
    state = _decode(state, params, forced_S, state.finish_S == RUNNING, config, dtype)
    return state, state.last_token_S, state.finish_S


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnums=(0,))
def generate_steps(state: DecodeState, params, forced_NS, pause_id, *, config: GPTConfig, dtype=None):
    """N = forced_NS.shape[0] generate_steps in one call (a lax.scan): one dispatch and one
    host sync per N tokens. Row n of forced_NS forces step n.

    A slot that emits `pause_id` (<|python_end|>) sits out the rest of the call, so the
    host can run the calculator and force its output from the next call's first step:
    the tokens are those of N single steps. Returns (state, tokens_NS, finish_NS, fresh_NS,
    (logprob_NS, top_ids_NSL, top_lp_NSL)); fresh marks the steps in which a slot produced a token.
    """
    def body(carry, forced_S):
        state, paused_S = carry
        active_S = (state.finish_S == RUNNING) & ~paused_S
        state = _decode(state, params, forced_S, active_S, config, dtype)
        paused_S = paused_S | (active_S & (state.last_token_S == pause_id))
        return (state, paused_S), (state.last_token_S, state.finish_S, active_S,
                                   (state.logprob_S, state.top_ids_SL, state.top_lp_SL))

    (state, _), (tokens_NS, finish_NS, fresh_NS, logprobs) = jax.lax.scan(
        body, (state, jnp.zeros_like(state.finish_S, bool)), forced_NS)
    return state, tokens_NS, finish_NS, fresh_NS, logprobs
