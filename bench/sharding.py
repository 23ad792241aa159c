"""Train-step time and per-device memory on different meshes (d4 on CPU fake devices by default).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.sharding
    python -m bench.sharding --depth 12 20 --seq-len 2048 --dtype bfloat16 --meshes data=-1 fsdp=-1   # GPU

One JSON line per (depth, mesh): median step time, tokens/s, MFU where the peak FLOPs of the
device are known, and per-device bytes of the train state (params + optimizer state) and
of XLA's temporary buffers for the step.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from bench.forward import timed
from nanochat_jax import flops, optim, sharding
from nanochat_jax.config import config_for_depth
from nanochat_jax.train_step import init_train_state, jit_train_step, make_train_step

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense, per device


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, nargs="+", default=[4])
    ap.add_argument("--meshes", nargs="+", default=["data=-1", "fsdp=-1", "data=-1,model=2", "data=2,fsdp=2,model=-1"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="global rows per micro-step")
    ap.add_argument("--micro-steps", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
    for depth in args.depth:
        config = config_for_depth(depth, max_seq_len=args.seq_len, vocab_size=args.vocab_size)
        tx = optim.make_optimizer(config, 1000, weight_decay=0.1, dtype=args.dtype)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.micro_steps, args.batch_size, args.seq_len + 1))
        for spec in args.meshes:
            mesh = sharding.make_mesh(spec)
            sharding.validate(config, mesh, args.batch_size)
            state = [init_train_state(config, tx, mesh, jax.random.key(0), args.dtype)]
            step = make_train_step(config, tx, mesh, dtype=args.dtype)
            inputs, targets = tokens[..., :-1].astype(np.int32), tokens[..., 1:].astype(np.int32)
            state_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state[0]))
            with jax.set_mesh(mesh):
                jitted = jit_train_step(config, tx, mesh, dtype=args.dtype)
                mem = jitted.lower(state[0], inputs, targets, None, None).compile().memory_analysis()

            def run():
                state[0], m = step(state[0], inputs, targets)
                jax.block_until_ready(m["loss"])
            sec = timed(run, args.warmup, args.iters)
            n_tok = args.micro_steps * args.batch_size * args.seq_len
            mfu = flops.estimate_flops(config) * n_tok / sec / (peak * jax.device_count()) if peak else None
            print(json.dumps(dict(depth=depth, mesh=dict(mesh.shape), device=kind, n_devices=jax.device_count(),
                                  dtype=args.dtype, step_s=sec, tok_per_s=n_tok / sec, mfu=mfu,
                                  state_bytes_per_device=state_bytes,
                                  temp_bytes_per_device=getattr(mem, "temp_size_in_bytes", None))), flush=True)


if __name__ == "__main__":
    main()
