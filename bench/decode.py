"""Decode throughput: our KV-cache Engine and continuous-batching Scheduler vs the torch reference
and, given a checkout, upstream nanochat's own Engine.

    python -m bench.decode                           # CPU: d4 (n_embd 256), vocab 32768, T=256, fp32
    python -m bench.decode --streams 8 32 128 --steps-per-call 1 8 --depth 12   # bigger machines
    git clone https://github.com/karpathy/nanochat /tmp/nanochat
    python -m bench.decode --nanochat-src /tmp/nanochat   # adds upstream's Engine, same weights and prompt

Every run decodes --new-tokens greedy tokens after a --prompt-tokens random prompt, on the
same random weights (JAX params moved into the torch model with convert.py):

  jax-engine      Engine.generate, batch 1
  jax-engine-samples  Engine.generate(num_samples=8) on one prompt: one prefill, 8 slots, as
                  upstream counts a batch (per --torch-batch above 1); tokens_match against batch 1
  jax-scheduler   N different prompts through the Scheduler (slots = N): aggregate
  torch-naive     torch_ref.generate: the full forward recomputed per token, batch 1
  torch-kv        a KV-cached decode loop written here over torch_ref's modules, batch 1 and 8
                  (both torch rows run in a fresh subprocess, after the JAX rows)
  upstream-engine with --nanochat-src: upstream's Engine.generate on one prompt, num_samples 1 and
                  8 (as upstream counts a batch), our weights in its checkpoint layout, loaded by
                  its build_model in a subprocess (bench/upstream.py); tokens_match says whether
                  every sample's greedy tokens equal our Engine's (a mismatch adds an "error" line)

One JSON line per measurement (best of --repeats runs after an untimed warm-up):
tok_per_s is decode throughput as upstream's infer_bench counts it (tokens after each
stream's first / time after the first token), ms_per_step the time per decode step after the
first token, e2e_tok_per_s includes prefill; ttft_s is the mean time to first token, wall_s the
whole run. The last line compares ours at batch 1 and 8 with what ran beside it in this run;
at batch 8 it gives both of ours (8 samples of one prompt, upstream's counting, and 8 different
prompts through the scheduler) and names the row behind each ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import upstream
from nanochat_jax import model
from nanochat_jax.config import config_for_depth
from nanochat_jax.convert import state_dict_from_params
from nanochat_jax.tokenizer import SPECIAL_TOKENS
from nanochat_jax.scheduler import Engine, Request, Scheduler


class BenchTokenizer:
    """The specials are the last ids of the vocabulary; make_params zeroes their head columns, so
    their logits (0) never win a greedy step: every run yields exactly --new-tokens tokens."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
        self.n_text = vocab_size - len(SPECIAL_TOKENS)

    def encode_special(self, s):
        return self.n_text + SPECIAL_TOKENS.index(s)

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode("latin-1")


def make_params(config, seed=0):
    """Init params with every weight perturbed (init zeroes c_proj), so all blocks do work."""
    params = model.init_params(config, jax.random.key(seed), jnp.float32)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: np.asarray(a) + 0.02 * rng.standard_normal(a.shape).astype(a.dtype), params)
    params["lm_head"]["kernel"][:, config.vocab_size - len(SPECIAL_TOKENS):] = 0.0  # BenchTokenizer's specials
    return jax.tree.map(jnp.asarray, params)


def row(impl, batch, tokens, wall, ttfts, **extra):
    """tokens: per stream. Decode rate counts tokens after each stream's first one."""
    first = max(ttfts)
    out = dict(impl=impl, batch=batch, tok_per_s=(sum(tokens) - batch) / (wall - first), ttft_s=statistics.mean(ttfts),
               ms_per_step=1000 * (wall - first) / max(max(tokens) - 1, 1),
               wall_s=wall, e2e_tok_per_s=sum(tokens) / wall, tokens=sum(tokens))
    return {**out, **extra}


def best_run(fn, repeats):
    """The fastest of `repeats` runs: on a shared machine the others measure the neighbours."""
    return max((fn() for _ in range(repeats)), key=lambda r: r["tok_per_s"])


# ---- ours -----------------------------------------------------------------------------------------

def bench_engine(eng, prompt, new, steps, samples=1):
    """samples > 1: upstream's batch, num_samples of one prompt; the row's outs are every sample's tokens."""
    def run():
        t0 = time.perf_counter()
        ttft, cols = None, []
        for col, _ in eng.generate(prompt, num_samples=samples, max_tokens=new, temperature=0.0):
            ttft = ttft or time.perf_counter() - t0
            cols.append(col)
        wall, outs = time.perf_counter() - t0, [list(r) for r in zip(*cols)]
        if samples == 1:
            return row("jax-engine", 1, [len(cols)], wall, [ttft], steps_per_call=steps, out=outs[0])
        return row("jax-engine-samples", samples, [len(cols)] * samples, wall, [ttft], steps_per_call=steps,
                   prompts=1, outs=outs)
    return run


def bench_scheduler(sched, prompts, new, steps):
    def run():
        done, lock, first, left = threading.Event(), threading.Lock(), {}, [len(prompts)]
        reqs = []
        t0 = time.perf_counter()

        def on_event(ev, i):
            if ev is not None:
                first.setdefault(i, time.perf_counter() - t0)
                return
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()
        for i, p in enumerate(prompts):
            reqs.append(sched.submit(Request(p, lambda ev, i=i: on_event(ev, i), max_tokens=new, temperature=0.0)))
        done.wait()
        wall = time.perf_counter() - t0
        assert not any(r.error for r in reqs), [r.error for r in reqs]
        return row("jax-scheduler", len(prompts), [r.completion_tokens for r in reqs], wall,
                   [first[i] for i in range(len(prompts))], steps_per_call=steps, prompts=len(prompts))
    return run


# ---- the torch reference ------------------------------------------------------------------------------

class TorchKVDecoder:
    """nanochat's forward with a KV cache, written over torch_ref's modules (docs/numerics.md#generation):
    preallocated (layer, B, Hkv, T, D) caches, smear from the cached previous embedding,
    rotary at absolute positions, sliding windows as SDPA masks. All rows share one length."""

    def __init__(self, ref, batch, max_len):
        import torch

        cfg = ref.config
        self.ref, self.torch = ref, torch
        hd = cfg.n_embd // cfg.n_head
        self.device = ref.lm_head.weight.device
        self.k = torch.zeros(cfg.n_layer, batch, cfg.n_kv_head, max_len, hd, dtype=ref.compute_dtype,
                             device=self.device)
        self.v = torch.zeros_like(self.k)
        self.pos, self.prev = 0, None

    def forward(self, idx_BT):
        from nanochat_jax.torch_ref.model import QK_SCALE, SMEAR_CHANNELS, SOFTCAP, VE_GATE_CHANNELS, apply_rotary, norm

        torch, m, cfg = self.torch, self.ref, self.ref.config
        B, T = idx_BT.shape
        H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        p0 = self.pos
        x = norm(m.transformer.wte(idx_BT).to(m.compute_dtype))
        prev = torch.cat([self.prev[:, None] if self.prev is not None else torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        gate = m.smear_lambda.to(x.dtype) * torch.sigmoid(m.smear_gate(x[..., :SMEAR_CHANNELS]))
        smeared = x + gate * prev
        if p0 == 0:  # the sequence's first token has no predecessor
            smeared[:, 0] = x[:, 0]
        self.prev = x[:, -1]
        x = x0 = smeared
        cos, sin = m.cos[:, p0:p0 + T], m.sin[:, p0:p0 + T]
        qpos = torch.arange(p0, p0 + T, device=self.device)[:, None]
        j = torch.arange(p0 + T, device=self.device)[None]
        for i, block in enumerate(m.transformer.h):
            x = m.resid_lambdas[i].to(x.dtype) * x + m.x0_lambdas[i].to(x.dtype) * x0
            attn, xn = block.attn, norm(x)
            q = attn.c_q(xn).view(B, T, H, hd)
            k = attn.c_k(xn).view(B, T, Hkv, hd)
            v = attn.c_v(xn).view(B, T, Hkv, hd)
            if str(i) in m.value_embeds:
                ve = m.value_embeds[str(i)](idx_BT).to(x.dtype).view(B, T, Hkv, hd)
                v = v + (3 * torch.sigmoid(attn.ve_gate(xn[..., :VE_GATE_CHANNELS])))[..., None] * ve
            q = norm(apply_rotary(q, cos, sin)) * QK_SCALE
            k = norm(apply_rotary(k, cos, sin)) * QK_SCALE
            self.k[i, :, :, p0:p0 + T] = k.transpose(1, 2)
            self.v[i, :, :, p0:p0 + T] = v.transpose(1, 2)
            left = m.window_lefts[i]
            mask = (j <= qpos) & (j >= qpos - left)
            y = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), self.k[i, :, :, :p0 + T], self.v[i, :, :, :p0 + T], attn_mask=mask, enable_gqa=True)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, cfg.n_embd))
            x = x + block.mlp(norm(x))
            if i == cfg.n_layer // 2:
                x_backout = x
        x = x[:, -1] - m.backout_lambda.to(x.dtype) * x_backout[:, -1]
        logits = m.lm_head(norm(x))[..., :cfg.vocab_size].float()
        self.pos += T
        return SOFTCAP * torch.tanh(logits / SOFTCAP)


def bench_torch_kv(ref, prompts, new, max_len):
    import torch

    device = ref.lm_head.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            t0 = time.perf_counter()
            dec = TorchKVDecoder(ref, len(prompts), max_len)
            tok = dec.forward(torch.tensor(prompts, device=device)).argmax(-1)
            sync()
            ttft = time.perf_counter() - t0
            out = [tok]
            for _ in range(new - 1):
                tok = dec.forward(tok[:, None]).argmax(-1)
                out.append(tok)
            sync()
            wall = time.perf_counter() - t0
        return row("torch-kv", len(prompts), [new] * len(prompts), wall, [ttft],
                   out=torch.stack(out, 1)[0].tolist())
    return run


def bench_torch_naive(ref, prompt, new):
    from nanochat_jax.torch_ref.generate import generate

    def run():
        t0 = time.perf_counter()
        ttft, out = None, []
        for t in generate(ref, list(prompt), new, temperature=0.0):
            ttft = ttft or time.perf_counter() - t0
            out.append(t)
        return row("torch-naive", 1, [len(out)], time.perf_counter() - t0, [ttft], out=out)
    return run


def bench_torch(args, config, params, prompts, new):
    """The torch rows: naive generate (batch 1) and the KV-cached loop per --torch-batch."""
    import torch

    from nanochat_jax.torch_ref import GPT as TorchGPT

    ref = TorchGPT(config, dtype=getattr(torch, args.dtype), device="cuda" if torch.cuda.is_available() else "cpu")
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict_from_params(params, config).items()})
    ref.eval()
    for threads in args.torch_threads:  # 1 thread often wins on a busy 2-core machine (no OpenMP barriers)
        torch.set_num_threads(threads)
        naive = bench_torch_naive(ref, prompts[0], new)
        naive()  # warm-up
        yield {**best_run(naive, min(args.repeats, 2)), "threads": threads}
        for b in args.torch_batch:
            run = bench_torch_kv(ref, prompts[:b], new, args.prompt_tokens + new)
            run()
            yield {**best_run(run, args.repeats), "threads": threads}


# ---- upstream nanochat ------------------------------------------------------------------------------

def bench_upstream(args, config, params, tok, prompt, new):
    """upstream's Engine on our weights, batch 1 and 8 samples of one prompt: the best run of each."""
    job = dict(mode="decode", prompt=prompt, new_tokens=new, batches=sorted({1, *args.torch_batch}),
               threads=args.torch_threads, repeats=args.repeats, vocab_size=config.vocab_size,
               specials={s: tok.encode_special(s) for s in SPECIAL_TOKENS})
    runs = [row("upstream-engine", r["batch"], r["tokens"], r["wall"], [r["ttft"]], threads=r["threads"],
                prompts=1, outs=r["outs"], compute_dtype=r["compute_dtype"])
            for r in upstream.run(args.nanochat_src, params, config, job, args.dtype)]
    for key in sorted({(r["threads"], r["batch"]) for r in runs}):
        yield max((r for r in runs if (r["threads"], r["batch"]) == key), key=lambda r: r["tok_per_s"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, nargs="+", default=[8, 32], help="concurrent requests (= slots)")
    ap.add_argument("--torch-batch", type=int, nargs="*", default=[1, 8], help="KV-cached torch loop batch sizes")
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts")
    ap.add_argument("--steps-per-call", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (GPU: bfloat16)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--nanochat-src", metavar="DIR", help="a checkout of upstream nanochat: adds its Engine's rows")
    ap.add_argument("--part", choices=["all", "jax", "torch"], default="all",
                    help="all: JAX here, then torch in a fresh subprocess (torch's OpenMP threads slow to a "
                         "crawl beside XLA's thread pool in one process on a busy 2-core machine)")
    args = ap.parse_args(argv)
    if args.nanochat_src:
        upstream.check_src(args.nanochat_src)  # fail before the long JAX part

    config = config_for_depth(args.depth, max_seq_len=args.seq_len, vocab_size=args.vocab_size)
    params = make_params(config)
    tok = BenchTokenizer(config.vocab_size)
    rng = np.random.default_rng(0)
    n_prompts = max(args.streams + args.torch_batch + [1])
    prompts = rng.integers(0, tok.n_text, (n_prompts, args.prompt_tokens)).tolist()
    new = args.new_tokens
    base = dict(depth=args.depth, n_embd=config.n_embd, vocab=config.vocab_size, prompt_tokens=args.prompt_tokens,
                new_tokens=new, dtype=args.dtype, device=str(jax.devices()[0].device_kind))
    rows = []

    def emit(r, keep_out=False):
        r = {**base, **{k: v for k, v in r.items() if k not in ("out", "outs") or keep_out}}
        rows.append(r)
        print(json.dumps(r), flush=True)

    if args.part == "torch":  # rows carry their greedy tokens for the parent's parity check
        for r in bench_torch(args, config, params, prompts, new):
            emit(r, keep_out=True)
        return

    engine_out = None
    for steps in args.steps_per_call:
        eng = Engine(params, config, tok, dtype=jnp.dtype(args.dtype), steps_per_call=steps)
        run = bench_engine(eng, prompts[0], new, steps)
        engine_out = run()["out"]  # warm-up (compiles)
        emit(best_run(run, args.repeats))
        for b in sorted({b for b in args.torch_batch if b > 1}):
            run = bench_engine(eng, prompts[0], new, steps, samples=b)
            run()
            r = best_run(run, args.repeats)
            emit({**r, "tokens_match": all(o == engine_out for o in r["outs"])})
        for n in args.streams:
            sched = Scheduler(eng, slots=n, max_queue=n, steps_per_call=steps)
            try:
                warm = sched.warmup()  # the first also compiles the prefill buckets
                run = bench_scheduler(sched, prompts[:n], new, steps)
                run()
                emit({**best_run(run, args.repeats), "warmup_s": warm})
            finally:
                sched.close()

    if args.part == "all" and not args.no_torch:
        cmd = [sys.executable, "-m", "bench.decode", "--part", "torch", *(argv if argv is not None else sys.argv[1:])]
        child = subprocess.run(cmd, check=True, capture_output=True, text=True)
        for line in child.stdout.splitlines():
            r = json.loads(line)
            emit({**r, "matches_jax_engine": r.pop("out") == engine_out})

    if args.nanochat_src:
        for r in bench_upstream(args, config, params, tok, prompts[0], new):
            bad = [o for o in r.pop("outs") if o != engine_out]
            emit({**r, "tokens_match": not bad})
            if bad:  # a loud line, not a crash: the timings above still stand
                at = next((i for i, (a, b) in enumerate(zip(bad[0], engine_out)) if a != b), len(bad[0]))
                err = dict(error="upstream's greedy tokens differ from our Engine's", batch=r["batch"],
                           threads=r["threads"], rows_differing=len(bad), first_diff_at=at)
                print("ERROR: " + json.dumps(err), file=sys.stderr, flush=True)
                emit(err)

    def best(impls, batch):
        got = [r["tok_per_s"] for r in rows if r.get("impl") in impls and r["batch"] == batch]
        return max(got) if got else None
    def ratio(a, b):
        return a / b if a and b else None
    summary = {"summary": "decode tok/s, best row of each kind in this run; batch 8 counted two ways: "
                          "samples = num_samples 8 of one prompt (upstream's counting, jax-engine-samples vs "
                          "upstream-engine), prompts = 8 different prompts (jax-scheduler vs torch-kv)"}
    ours1, up1, kv1 = best({"jax-engine", "jax-scheduler"}, 1), best({"upstream-engine"}, 1), best({"torch-kv"}, 1)
    summary["batch1"] = {"ours": ours1, "upstream": up1, "ours_over_upstream": ratio(ours1, up1),
                         "torch_kv": kv1, "ours_over_torch_kv": ratio(ours1, kv1)}
    samples, sched, up8, kv8 = (best({impl}, 8) for impl in ("jax-engine-samples", "jax-scheduler",
                                                               "upstream-engine", "torch-kv"))
    summary["batch8"] = {"ours_samples": samples, "ours_prompts": sched, "upstream_samples": up8, "torch_kv_prompts": kv8,
                         "samples_over_upstream": ratio(samples, up8), "prompts_over_upstream": ratio(sched, up8),
                         "prompts_over_torch_kv": ratio(sched, kv8)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
