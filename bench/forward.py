"""Forward+backward step time: JAX model vs the PyTorch reference, side by side in one run.

    python -m bench.forward                      # CPU: d4, T=256, B=8, fp32
    python -m bench.forward --depth 12 20 --seq-len 2048 --batch-size 8 --dtype bfloat16 \
        --attention xla cudnn                    # GPU

Prints one JSON line per (framework, depth, attention) and a final ratio line. Times are
the median of --iters timed calls after --warmup untimed ones (the first JAX call
compiles; its time is reported separately as compile_s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import flops, model
from nanochat_jax.common import tune_malloc
from nanochat_jax.config import config_for_depth
from nanochat_jax.convert import params_from_state_dict


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_jax(config, params, tokens, dtype, attention, warmup, iters):
    def loss(p, x):
        return model.loss_fn(p, x[:, :-1], x[:, 1:], config, dtype=dtype, backend=attention)
    step = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, tokens))
    compile_s = time.perf_counter() - t0
    sec = timed(lambda: jax.block_until_ready(step(params, tokens)), warmup, iters)
    return sec, compile_s


def bench_torch(ref, tokens, warmup, iters, compiled):
    import torch

    x = torch.from_numpy(np.asarray(tokens)).to(next(ref.parameters()).device)
    inputs, targets = x[:, :-1], x[:, 1:]
    fwd = torch.compile(ref) if compiled else ref

    def step():
        ref.zero_grad(set_to_none=True)
        fwd(inputs, targets).backward()
        if x.is_cuda:
            torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    return timed(step, warmup, iters), compile_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, nargs="+", default=[4])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", nargs="+", default=["xla"], help="JAX backends to time (xla, cudnn, splash)")
    ap.add_argument("--torch", nargs="*", default=["eager"], choices=["eager", "compile"],
                    help="torch reference variants to time (none: skip torch)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    tune_malloc()  # as the training entry points do (common.tune_malloc)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    jdtype = jnp.dtype(args.dtype)
    from nanochat_jax.torch_ref import GPT as TorchGPT

    for depth in args.depth:
        config = config_for_depth(depth, max_seq_len=args.seq_len, vocab_size=args.vocab_size)
        ref = TorchGPT(config, dtype=tdtype, device=device)
        params = jax.tree.map(jnp.asarray, params_from_state_dict(ref.state_dict(), config))
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
        n_tok = args.batch_size * args.seq_len
        base = dict(depth=depth, seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype,
                    jax_device=str(jax.devices()[0].device_kind), torch_device=device,
                    flops_per_token=flops.estimate_flops(config))
        rows = []
        for attention in args.attention:
            sec, compile_s = bench_jax(config, params, tokens, jdtype, attention, args.warmup, args.iters)
            rows.append(dict(base, framework="jax", attention=attention, step_s=sec, compile_s=compile_s,
                             tok_per_s=n_tok / sec))
            print(json.dumps(rows[-1]), flush=True)
        for variant in args.torch:
            sec, compile_s = bench_torch(ref, tokens, args.warmup, args.iters, compiled=variant == "compile")
            rows.append(dict(base, framework=f"torch-{variant}", attention="sdpa", step_s=sec, compile_s=compile_s,
                             tok_per_s=n_tok / sec))
            print(json.dumps(rows[-1]), flush=True)
        jax_best = min((r for r in rows if r["framework"] == "jax"), key=lambda r: r["step_s"])
        for r in rows:
            if r["framework"].startswith("torch"):
                print(json.dumps({"depth": depth, "ratio": f"{r['framework']} / jax[{jax_best['attention']}]",
                                  "speedup_of_jax": r["step_s"] / jax_best["step_s"]}), flush=True)


if __name__ == "__main__":
    main()
