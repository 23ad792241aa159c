"""Training throughput: our base_train step (jit, sharded, nanochat MuonAdamW) vs the PyTorch
reference loop (torch.compile'd model + the reference MuonAdamW) and, given a checkout, upstream
nanochat's own step (its torch.compile'd GPT + its MuonAdamW) on the same weights and batches.

    python -m bench.train                                      # CPU: d4, T=256, B=8, vocab 32768, fp32
    python -m bench.train --depth 12 20 --seq-len 2048 --batch-size 32 --dtype bfloat16   # GPU
    git clone https://github.com/karpathy/nanochat /tmp/nanochat
    python -m bench.train --nanochat-src /tmp/nanochat   # adds upstream's step (bench/upstream.py)

JSON lines: step time, tok/s, MFU (where the device's peak is known), first-step (compile)
time, peak device memory, and the speed-up of JAX over the torch loop (and over upstream's step,
run in a subprocess on our initial weights exported in its checkpoint layout). `--framework jax`,
`torch` or `upstream` runs one side only (the GPU proof kit runs each in its own process, so neither
framework's allocator holds memory the other needs, and a slow compile of one cannot eat the
others' time; `--torch-eager` also runs upstream's step uncompiled); `--compile-cache DIR` turns on JAX's
persistent compilation cache, so a second run shows the warm compile time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from bench import upstream
from bench.forward import timed
from nanochat_jax import flops, model, optim, sharding
from nanochat_jax.common import mfu, peak_flops, tune_malloc
from nanochat_jax.config import config_for_depth
from nanochat_jax.convert import params_from_state_dict
from nanochat_jax.train_step import init_train_state, make_train_step


def cache_files(path):
    """Entries in JAX's persistent compilation cache (None without one): equal before and after a
    run means every compile was a cache hit."""
    if not path:
        return None
    from pathlib import Path
    return sum(1 for p in Path(path).rglob("*") if p.is_file())


def jax_peak_bytes():
    """Peak bytes in use on the first device so far (None where the backend keeps no stats, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, nargs="+", default=[4])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mesh", default="data=-1")
    ap.add_argument("--framework", default="both", choices=["both", "jax", "torch", "upstream"],
                    help="both: jax and the torch reference (and upstream's step, given --nanochat-src)")
    ap.add_argument("--no-torch", action="store_true", help="same as --framework jax")
    ap.add_argument("--torch-eager", action="store_true", help="the torch loop (and upstream's) without torch.compile")
    ap.add_argument("--compile-cache", metavar="DIR", help="JAX persistent compilation cache directory")
    ap.add_argument("--nanochat-src", metavar="DIR", help="a checkout of upstream nanochat: adds its step's row")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc's allocator as it is (by default both loops run with common.tune_malloc, "
                         "as base_train does)")
    args = ap.parse_args(argv)
    if args.no_torch:
        args.framework = "jax"
    if args.framework == "upstream" and not args.nanochat_src:
        ap.error("--framework upstream needs --nanochat-src DIR")
    if args.nanochat_src:
        upstream.check_src(args.nanochat_src)
    tuned = False if args.no_malloc_tuning else tune_malloc()
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    torch = None
    if args.framework in ("both", "torch"):
        import torch

        from nanochat_jax.torch_ref import GPT as TorchGPT
        from nanochat_jax.torch_ref import setup_optimizer

    peak = peak_flops()
    for depth in args.depth:
        config = config_for_depth(depth, max_seq_len=args.seq_len, vocab_size=args.vocab_size)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
        x, y = tokens[None, :, :-1].astype(np.int32), tokens[None, :, 1:].astype(np.int32)
        n_tok = args.batch_size * args.seq_len
        fpt = flops.estimate_flops(config)
        base = dict(depth=depth, seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype,
                    device=str(jax.devices()[0].device_kind), flops_per_token=fpt, malloc_tuned=tuned)
        ref = None
        if torch is not None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
            ref = TorchGPT(config, dtype=tdtype, device=device)

        jax_s = init = None
        if args.framework in ("both", "jax"):
            mesh = sharding.make_mesh(args.mesh)
            tx = optim.make_optimizer(config, 1000, weight_decay=0.1, dtype=args.dtype)
            # Both sides start from the same weights when they run in one process.
            params = params_from_state_dict(ref.state_dict(), config) if ref is not None else None
            key = jax.random.key(0) if params is None else None
            state = [init_train_state(config, tx, mesh, key, args.dtype, params=params)]
            init = jax.device_get(state[0].params) if args.nanochat_src else None  # before donation
            step = make_train_step(config, tx, mesh, dtype=args.dtype)

            def jax_step():
                state[0], m = step(state[0], x, y)
                jax.block_until_ready(m["loss"])
            cached_before = cache_files(args.compile_cache)
            t0 = time.perf_counter()
            jax_step()
            compile_s = time.perf_counter() - t0
            jax_s = timed(jax_step, args.warmup, args.iters)
            print(json.dumps(dict(base, framework="jax", step_s=jax_s, tok_per_s=n_tok / jax_s, compile_s=compile_s,
                                  cache_files_before=cached_before, cache_files_after=cache_files(args.compile_cache),
                                  peak_bytes=jax_peak_bytes(),
                                  mfu=mfu(fpt, n_tok, jax_s, jax.device_count(), peak))), flush=True)
            del state, step
        if args.nanochat_src:
            job = dict(mode="train", x=x[0].tolist(), y=y[0].tolist(), warmup=args.warmup, iters=args.iters,
                       weight_decay=0.1, vocab_size=config.vocab_size, compile=not args.torch_eager)
            if init is None:  # no JAX step ran in this process: torch's init, else ours (key 0, as init_train_state)
                init = (params_from_state_dict(ref.state_dict(), config) if ref is not None
                        else jax.device_get(model.init_params(config, jax.random.key(0), args.dtype)))
            u = upstream.run(args.nanochat_src, init, config, job, args.dtype)[0]
            up_s = statistics.median(u["step_times"])
            print(json.dumps(dict(base, framework="upstream" + ("" if args.torch_eager else "+compile"),
                                  step_s=up_s, tok_per_s=n_tok / up_s,
                                  compile_s=u["compile_s"], first_loss=u["first_loss"],
                                  compute_dtype=u["compute_dtype"], mfu=mfu(fpt, n_tok, up_s, 1, peak))), flush=True)
            if jax_s is not None:
                print(json.dumps({"depth": depth, "speedup_of_jax_over_upstream": up_s / jax_s}), flush=True)
        if ref is None:
            continue

        opt = setup_optimizer(ref, weight_decay=0.1)
        fwd = ref if args.torch_eager else torch.compile(ref)
        tx_, ty_ = (torch.from_numpy(a[0].astype(np.int64)).to(device) for a in (x, y))
        cuda = device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def torch_step():
            loss = fwd(tx_, ty_)
            loss.backward()
            opt.step()
            ref.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch_step()
        tcompile_s = time.perf_counter() - t0
        torch_s = timed(torch_step, args.warmup, args.iters)
        print(json.dumps(dict(base, framework="torch_ref" + ("" if args.torch_eager else "+compile"), step_s=torch_s, tok_per_s=n_tok / torch_s,
                              compile_s=tcompile_s, peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                              mfu=mfu(fpt, n_tok, torch_s, 1, peak))), flush=True)
        if jax_s is not None:
            print(json.dumps({"depth": depth, "speedup_of_jax": torch_s / jax_s}), flush=True)
        del ref, opt, fwd
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
