"""Training throughput: our base_train step (jit, sharded, nanochat MuonAdamW) vs the PyTorch
reference loop (torch.compile'd model + the reference MuonAdamW) on the same batches.

    python -m bench.train                                      # CPU: d4, T=256, B=8, vocab 32768, fp32
    python -m bench.train --depth 12 20 --seq-len 2048 --batch-size 32 --dtype bfloat16   # GPU

JSON lines: step time, tok/s, MFU (where the device's peak is known), compile time, and
the speed-up of JAX over the torch loop.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from bench.forward import timed
from nanochat_jax import flops, optim, sharding
from nanochat_jax.common import mfu, peak_flops, tune_malloc
from nanochat_jax.config import config_for_depth
from nanochat_jax.convert import params_from_state_dict
from nanochat_jax.train_step import init_train_state, make_train_step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, nargs="+", default=[4])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mesh", default="data=-1")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc's allocator as it is (by default both loops run with common.tune_malloc, "
                         "as base_train does)")
    args = ap.parse_args(argv)
    tuned = False if args.no_malloc_tuning else tune_malloc()

    import torch

    from nanochat_jax.torch_ref import GPT as TorchGPT
    from nanochat_jax.torch_ref import setup_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = peak_flops()
    for depth in args.depth:
        config = config_for_depth(depth, max_seq_len=args.seq_len, vocab_size=args.vocab_size)
        ref = TorchGPT(config, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype], device=device)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
        n_tok = args.batch_size * args.seq_len
        fpt = flops.estimate_flops(config)
        base = dict(depth=depth, seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype,
                    device=str(jax.devices()[0].device_kind), flops_per_token=fpt, malloc_tuned=tuned)

        mesh = sharding.make_mesh(args.mesh)
        tx = optim.make_optimizer(config, 1000, weight_decay=0.1, dtype=args.dtype)
        params = params_from_state_dict(ref.state_dict(), config)
        state = [init_train_state(config, tx, mesh, None, args.dtype, params=params)]
        step = make_train_step(config, tx, mesh, dtype=args.dtype)
        x, y = tokens[None, :, :-1].astype(np.int32), tokens[None, :, 1:].astype(np.int32)

        def jax_step():
            state[0], m = step(state[0], x, y)
            jax.block_until_ready(m["loss"])
        t0 = time.perf_counter()
        jax_step()
        compile_s = time.perf_counter() - t0
        jax_s = timed(jax_step, args.warmup, args.iters)
        print(json.dumps(dict(base, framework="jax", step_s=jax_s, tok_per_s=n_tok / jax_s, compile_s=compile_s,
                              mfu=mfu(fpt, n_tok, jax_s, jax.device_count(), peak))), flush=True)
        del state
        if args.no_torch:
            continue

        opt = setup_optimizer(ref, weight_decay=0.1)
        fwd = torch.compile(ref)
        tx_, ty_ = (torch.from_numpy(a[0].astype(np.int64)).to(device) for a in (x, y))

        def torch_step():
            loss = fwd(tx_, ty_)
            loss.backward()
            opt.step()
            ref.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch_step()
        tcompile_s = time.perf_counter() - t0
        torch_s = timed(torch_step, args.warmup, args.iters)
        print(json.dumps(dict(base, framework="torch_ref+compile", step_s=torch_s, tok_per_s=n_tok / torch_s,
                              compile_s=tcompile_s, mfu=mfu(fpt, n_tok, torch_s, 1, peak))), flush=True)
        print(json.dumps({"depth": depth, "speedup_of_jax": torch_s / jax_s}), flush=True)


if __name__ == "__main__":
    main()
