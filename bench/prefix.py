"""Prefix reuse across chat turns: time to first token of each turn, with and without the store.

    python -m bench.prefix                        # CPU: d4, vocab 32768, seq 2048, 10 turns, fp32
    python -m bench.prefix --depth 20 --dtype bfloat16

One conversation of random tokens (random weights, greedy): a system prompt, then per turn a
user message and the model's reply, so turn k's prompt is turn k-1's plus the reply and the
new message. The same conversation runs through a Scheduler without the prefix store and one
with it, in one process. Each mode runs the conversation once untimed (compiles), clears its
store, then --repeats timed times (best per turn). One JSON line per turn and mode, and a last
line comparing the final turn.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.decode import BenchTokenizer, make_params
from nanochat_jax.config import config_for_depth
from nanochat_jax.scheduler import Engine, Request, Scheduler


def converse(sched, turns, reply_tokens):
    """Run the conversation; per turn (prompt tokens, tokens reused from the store, ttft seconds)."""
    prompt, out = list(turns[0]), []
    for user in turns[1:]:
        prompt += user
        got, first = [], []
        before = sched.prefix_cache.reused_tokens if sched.prefix_cache is not None else 0
        t0 = time.perf_counter()
        req = sched.submit(Request(list(prompt), lambda ev: None, max_tokens=reply_tokens, temperature=0.0,
                                   on_token=lambda *a: first.append(time.perf_counter()) or got.append(a[2])))
        while not all(ch.done for ch in req.choices):
            sched.run_once()
        assert req.error is None, req.error
        reused = sched.prefix_cache.reused_tokens - before if sched.prefix_cache is not None else 0
        out.append((len(prompt), reused, first[0] - t0))
        prompt += got
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("--depth", 4), ("--seq-len", 2048), ("--vocab-size", 32768), ("--turns", 10),
                          ("--prefix-cache-mb", 256), ("--repeats", 2)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--tokens", type=int, nargs=3, default=[200, 150, 32], metavar=("SYSTEM", "USER", "REPLY"),
                    help="system prompt, each user message and each reply")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    config = config_for_depth(args.depth, max_seq_len=args.seq_len, vocab_size=args.vocab_size)
    tok = BenchTokenizer(config.vocab_size)
    eng = Engine(make_params(config), config, tok, dtype=args.dtype)
    rng = np.random.default_rng(0)
    system, user, reply = args.tokens
    turns = [rng.integers(0, tok.n_text, n).tolist() for n in [system] + [user] * args.turns]
    last = {}
    for name, mb in (("cold", 0), ("reuse", args.prefix_cache_mb)):
        sched = Scheduler(eng, slots=1, thread=False, prefix_cache_bytes=mb << 20)
        converse(sched, turns, reply)  # compiles every shape this conversation needs
        runs = []
        for _ in range(args.repeats):
            if sched.prefix_cache is not None:
                sched.prefix_cache.clear()
            runs.append(converse(sched, turns, reply))
        for k, per_turn in enumerate(zip(*runs), start=1):
            n, reused, _ = per_turn[0]
            r = dict(mode=name, turn=k, prompt_tokens=n, reused_tokens=reused,
                     ttft_s=round(min(t for _, _, t in per_turn), 4), depth=args.depth, dtype=args.dtype)
            print(json.dumps(r), flush=True)
            last[name] = r
        if sched.prefix_cache is not None:
            print(json.dumps(dict(mode=name, store=sched.prefix_cache.stats())), flush=True)
    print(json.dumps(dict(summary="last turn", turn=args.turns, prompt_tokens=last["cold"]["prompt_tokens"],
                          ttft_cold_s=last["cold"]["ttft_s"], ttft_reuse_s=last["reuse"]["ttft_s"],
                          speedup=round(last["cold"]["ttft_s"] / last["reuse"]["ttft_s"], 2))), flush=True)


if __name__ == "__main__":
    main()
