"""Prefix reuse across chat turns: time to first token of each turn, with and without the store.

    python -m bench.prefix                        # CPU: d4, vocab 32768, seq 2048, 10 turns, fp32
    python -m bench.prefix --depth 20 --dtype bfloat16
    python -m bench.prefix --nanochat-src /path/to/nanochat   # adds upstream's Engine per turn

One conversation of random tokens (random weights, greedy): a system prompt, then per turn a
user message and the model's reply, so turn k's prompt is turn k-1's plus the reply and the
new message. The same conversation runs through a Scheduler without the prefix store and one
with it, in one process. Each mode runs the conversation once untimed (compiles), clears its
store, then --repeats timed times (best per turn). One JSON line per turn and mode, and a last
line comparing the final turn.

With --nanochat-src, upstream's Engine (which has no prefix reuse: it prefills the whole
conversation every turn) times its prefill and first token on the same token ids at the same
turns, on the same weights, in a subprocess after ours (bench/upstream.py, mode "ttft"); per turn
a line puts the three TTFTs side by side, first_token_match says whether its greedy first token
is ours, and the last line adds the ratios to upstream.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench import upstream
from bench.decode import BenchTokenizer, make_params
from nanochat_jax.config import config_for_depth
from nanochat_jax.scheduler import Engine, Request, Scheduler
from nanochat_jax.tokenizer import SPECIAL_TOKENS


def converse(sched, turns, reply_tokens):
    """Run the conversation; per turn (prompt ids, tokens reused from the store, ttft seconds, first token)."""
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
        out.append((list(prompt), reused, first[0] - t0, got[0]))
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
    ap.add_argument("--nanochat-src", metavar="DIR", help="a checkout of upstream nanochat: adds its Engine's TTFT")
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2], help="upstream's torch thread counts")
    args = ap.parse_args(argv)
    if args.nanochat_src:
        upstream.check_src(args.nanochat_src)  # fail before the long JAX part
    config = config_for_depth(args.depth, max_seq_len=args.seq_len, vocab_size=args.vocab_size)
    tok = BenchTokenizer(config.vocab_size)
    params = make_params(config)
    eng = Engine(params, config, tok, dtype=args.dtype)
    rng = np.random.default_rng(0)
    system, user, reply = args.tokens
    turns = [rng.integers(0, tok.n_text, n).tolist() for n in [system] + [user] * args.turns]
    last, ours = {}, {}
    for name, mb in (("cold", 0), ("reuse", args.prefix_cache_mb)):
        sched = Scheduler(eng, slots=1, thread=False, prefix_cache_bytes=mb << 20)
        converse(sched, turns, reply)  # compiles every shape this conversation needs
        runs = []
        for _ in range(args.repeats):
            if sched.prefix_cache is not None:
                sched.prefix_cache.clear()
            runs.append(converse(sched, turns, reply))
        for k, per_turn in enumerate(zip(*runs), start=1):
            prompt, reused, _, first = per_turn[0]
            r = dict(mode=name, turn=k, prompt_tokens=len(prompt), reused_tokens=reused,
                     ttft_s=round(min(t for _, _, t, _ in per_turn), 4), depth=args.depth, dtype=args.dtype)
            print(json.dumps(r), flush=True)
            ours.setdefault(k, {"prompt": prompt, "first": first})[name] = last[name] = r
        if sched.prefix_cache is not None:
            print(json.dumps(dict(mode=name, store=sched.prefix_cache.stats())), flush=True)
    summary = dict(summary="last turn", turn=args.turns, prompt_tokens=last["cold"]["prompt_tokens"],
                   ttft_cold_s=last["cold"]["ttft_s"], ttft_reuse_s=last["reuse"]["ttft_s"],
                   speedup=round(last["cold"]["ttft_s"] / last["reuse"]["ttft_s"], 2))
    if args.nanochat_src:
        summary.update(upstream_ttft(args, params, config, tok, ours))
    print(json.dumps(summary), flush=True)


def upstream_ttft(args, params, config, tok, ours):
    """upstream's TTFT on each turn's prompt (best over --torch-threads), printed beside ours per turn;
    the last turn's ratios for the summary line."""
    job = dict(mode="ttft", prompts=[ours[k]["prompt"] for k in sorted(ours)], threads=args.torch_threads,
               repeats=args.repeats, vocab_size=config.vocab_size,
               specials={s: tok.encode_special(s) for s in SPECIAL_TOKENS})
    got = upstream.run(args.nanochat_src, params, config, job, args.dtype)
    for r in got:
        print(json.dumps(dict(mode="upstream", turn=r["turn"], prompt_tokens=r["prompt_tokens"], threads=r["threads"],
                              ttft_s=round(r["ttft"], 4), first_token_match=r["first_token"] == ours[r["turn"]]["first"],
                              compute_dtype=r["compute_dtype"])), flush=True)
    side = {}
    for k, o in sorted(ours.items()):
        up = min((r for r in got if r["turn"] == k), key=lambda r: r["ttft"])
        side = dict(side_by_side=k, prompt_tokens=o["cold"]["prompt_tokens"], ttft_upstream_s=round(up["ttft"], 4),
                    ttft_cold_s=o["cold"]["ttft_s"], ttft_reuse_s=o["reuse"]["ttft_s"],
                    upstream_over_reuse=round(up["ttft"] / o["reuse"]["ttft_s"], 2),
                    upstream_over_cold=round(up["ttft"] / o["cold"]["ttft_s"], 2),
                    first_token_match=all(r["first_token"] == o["first"] for r in got if r["turn"] == k))
        print(json.dumps(side), flush=True)
    return {key: side[key] for key in ("ttft_upstream_s", "upstream_over_reuse", "upstream_over_cold",
                                        "first_token_match")}


if __name__ == "__main__":
    main()
