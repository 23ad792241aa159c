"""Bits per byte (docs/numerics.md#bpb): validation loss that does not depend on the tokenizer.

Per-token nats are summed only over targets that stand for raw bytes, and divided by
those bytes, so a bigger vocabulary can't look better just by making tokens longer.
Targets of -1 (ignored) and special tokens (0 bytes, e.g. BOS) add to neither sum.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanochat_jax import model, sharding
from nanochat_jax.common import resolve_dtype
from nanochat_jax.config import GPTConfig


def make_bpb_fn(config: GPTConfig, dtype=None, backend=None):
    """Jitted (params, inputs_BT, targets_BT, token_bytes_V) -> (sum_nats fp32, sum_bytes int32) for one batch.

    Cached per (config, dtype, backend), so each eval reuses one compiled function. Under
    jit the sums are global even when params and batches are sharded.
    """
    return _bpb_fn(config, resolve_dtype(dtype), backend)


@functools.lru_cache(maxsize=None)
def _bpb_fn(config: GPTConfig, dtype, backend):
    def sums(params, inputs_BT, targets_BT, token_bytes_V):
        nll = model.loss_fn(params, inputs_BT, targets_BT, config, reduction="none", dtype=dtype, backend=backend)
        valid = targets_BT >= 0
        nbytes = jnp.where(valid, token_bytes_V[jnp.where(valid, targets_BT, 0)], 0).reshape(-1)
        return jnp.where(nbytes > 0, nll, 0.0).sum(), nbytes.sum()

    return jax.jit(sums)


def evaluate_bpb(params, batches: Iterable[dict], config: GPTConfig, token_bytes, *, dtype=None, backend=None,
                 mesh: Mesh | None = None) -> float:
    """total_nats / (ln 2 · total_bytes) over {"inputs", "targets"} batches; inf if no bytes were seen.

    With a mesh, the model sees it (activation constraints) and host (numpy) batches are
    split over whichever of its batch axes ("data", "fsdp") it has; on multi-host pass
    global jax.Arrays (sharding.global_batch) instead. Per-batch sums stay on device until
    the end (no sync per batch) and are totalled in float64 on the host.
    """
    fn = make_bpb_fn(config, dtype, backend)
    token_bytes = np.asarray(token_bytes, np.int32)
    if mesh is None:
        run, put_batch = fn, jnp.asarray
        token_bytes = jnp.asarray(token_bytes)
    else:
        def run(*args):
            with jax.set_mesh(mesh):
                return fn(*args)

        batch_sh = NamedSharding(mesh, P(tuple(a for a in sharding.BATCH if a in mesh.axis_names) or None, None))
        put_batch = lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, batch_sh)  # noqa: E731
        token_bytes = jax.device_put(token_bytes, NamedSharding(mesh, P()))
    results = [run(params, put_batch(b["inputs"]), put_batch(b["targets"]), token_bytes) for b in batches]
    total_nats = sum(float(n) for n, _ in results)
    total_bytes = sum(int(b) for _, b in results)
    return total_nats / (math.log(2) * total_bytes) if total_bytes else math.inf
