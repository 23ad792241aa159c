"""Check a (multi-host) mesh before a long run: join the processes, build the mesh, create
a sharded model and optimizer, and run a few real training steps on synthetic tokens.

    python -m train.dist_check --mesh data=-1,fsdp=2,model=2 --depth 4            # one host
    python -m train.dist_check --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 ...

On TPU VMs and SLURM the process group is found automatically. Every process computes
the same synthetic global batch and feeds only the rows its devices hold; process 0 prints
one JSON line per step (loss and a parameter checksum), so runs on different meshes or
host counts can be compared line by line.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model, optim, sharding
from nanochat_jax.config import config_for_depth
from nanochat_jax.train_step import init_train_state, make_train_step


def perturbed_params(config, seed: int, dtype):
    """Init plus noise: the zero-initialized projections would make some gradients exactly 0."""
    params = model.init_params(config, jax.random.key(seed), dtype)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda a: a + (0.05 * jax.random.normal(next(keys), a.shape)).astype(a.dtype), params)


def run(mesh_spec: str, *, depth: int, seq_len: int, batch_size: int, micro_steps: int, steps: int,
        vocab_size: int, head_dim: int, dtype="float32", devices=None, seed: int = 0):
    config = config_for_depth(depth, head_dim=head_dim, max_seq_len=seq_len, vocab_size=vocab_size)
    mesh = sharding.make_mesh(mesh_spec, devices)
    sharding.validate(config, mesh, batch_size)
    tx = optim.make_optimizer(config, num_iterations=max(steps, 2), weight_decay=0.1, warmup_steps=0, dtype=dtype)
    state = init_train_state(config, tx, mesh, jax.random.key(seed), dtype,
                             params=jax.device_get(perturbed_params(config, seed, jnp.dtype(dtype))))
    train_step = make_train_step(config, tx, mesh, dtype=dtype)
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    shape = (micro_steps, batch_size, seq_len)
    rows = sharding.process_rows(batch_sh, shape, dim=1)
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(p)))
    out = []
    for step in range(steps):
        tokens = np.random.default_rng(seed + step).integers(0, vocab_size, (micro_steps, batch_size, seq_len + 1))
        local = tokens[:, rows]
        inputs = sharding.global_batch(local[..., :-1].astype(np.int32), batch_sh)
        targets = sharding.global_batch(local[..., 1:].astype(np.int32), batch_sh)
        state, metrics = train_step(state, inputs, targets)
        out.append({"step": step, "loss": float(metrics["loss"]), "param_abs_sum": float(checksum(state.params)),
                    "mesh": dict(mesh.shape), "processes": jax.process_count(), "devices": jax.device_count()})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", default="data=-1")
    ap.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host without auto-detection)")
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="global rows per micro-step")
    ap.add_argument("--micro-steps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    for line in run(args.mesh, depth=args.depth, seq_len=args.seq_len, batch_size=args.batch_size,
                    micro_steps=args.micro_steps, steps=args.steps, vocab_size=args.vocab_size,
                    head_dim=args.head_dim, dtype=args.dtype):
        if sharding.is_main_process():
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
