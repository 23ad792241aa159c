"""Serving on a mesh (docs/serving.md#serving-on-a-mesh): tensor parallel and replicas.

`model=N` splits the weights by the training rules (sharding.RULES: heads, kv heads, MLP
columns, vocab) and the KV cache on its kv-head axis, so each device holds 1/N of both and
XLA adds the all-reduces. `data=N` splits the decode state's slot axis: each replica runs
its own slots against a full copy of the weights. The state and the weights are placed once;
the jitted steps (engine.py) take them as they are and hand them back with the same
shardings (the state is donated), so nothing gathers onto one device per step.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanochat_jax import engine as E, model, sharding
from nanochat_jax.config import GPTConfig
from nanochat_jax.engine import DecodeState

CACHE = P("data", "model", None, None)  # (slot, kv head, position, head dim)


def serving_mesh(spec: str, devices=None) -> Mesh:
    """The mesh for `--mesh` (ValueError naming what to change); place_params checks the model.

    Fixed sizes take the first devices they need (model=2 on an 8-device host uses 2);
    -1 takes the rest, as in training. fsdp is a training layout: serving rejects it.
    """
    devices = list(jax.devices() if devices is None else devices)
    try:
        sizes = [int(p.partition("=")[2]) for p in spec.split(",") if p.strip()]
        need = None if -1 in sizes else math.prod(sizes)
    except ValueError:
        need = None  # malformed: make_mesh says why
    if need is not None and need < len(devices):
        devices = devices[:need]
    mesh = sharding.make_mesh(spec, devices)
    if mesh.shape["fsdp"] != 1:
        raise ValueError(f"mesh {spec!r}: serving splits over data (replicas) and model (tensor parallel) only, "
                         f"not fsdp")
    return mesh


def place_params(params, config: GPTConfig, mesh: Mesh):
    """Weights split by their logical axes (replicated over data), straight from the host.

    A quantized kernel (nanochat_jax/quantize.py) is split like the kernel it replaces: its int8
    values by the kernel's axes, its per-output-channel scales (one row) along the same columns,
    so each device dequantizes only its own slice."""
    sharding.validate(config, mesh)
    return jax.device_put(params, param_shardings(params, config, mesh))


def param_shardings(params, config: GPTConfig, mesh: Mesh):
    """place_params' shardings, one per leaf of params (quantized kernels included)."""
    def leaf(spec, p):
        s = NamedSharding(mesh, sharding.logical_to_mesh(spec))
        if not jax.tree_util.treedef_is_leaf(jax.tree.structure(p)):  # a QArray: values and scales
            return jax.tree.map(lambda a: NamedSharding(mesh, sharding.unsplit_size_one(s.spec, a.shape)), p)
        return s

    return jax.tree.map(leaf, model.param_axes(config), params, is_leaf=lambda x: isinstance(x, P))


def state_shardings(state: DecodeState, mesh: Mesh) -> DecodeState:
    """Every per-slot array split on its slot axis over data; the caches' kv heads over model."""
    def per_slot(a):
        return NamedSharding(mesh, P("data", *([None] * (a.ndim - 1))))

    out = jax.tree.map(per_slot, state)
    caches = tuple(NamedSharding(mesh, CACHE) for _ in state.k_cache)
    return out._replace(k_cache=caches, v_cache=caches, stop_ids_N=NamedSharding(mesh, P()))


def check_slots(mesh: Mesh, slots: int) -> None:
    if slots % mesh.shape["data"]:
        raise ValueError(f"{slots} slots do not split over data={mesh.shape['data']} replicas: "
                         f"make --slots a multiple of {mesh.shape['data']}")


def init_state(mesh: Mesh, config: GPTConfig, slots: int, max_len: int, stop_ids, dtype=None) -> DecodeState:
    """engine.init_state made in place on the mesh: no device ever holds the whole cache."""
    check_slots(mesh, slots)
    return _state_maker(mesh, config, slots, max_len, tuple(stop_ids), dtype)()


@functools.lru_cache(maxsize=16)
def _state_maker(mesh: Mesh, config: GPTConfig, slots: int, max_len: int, stop_ids: tuple, dtype):
    """One jitted maker per layout: Engine builds a Scheduler per call, which must not re-trace."""
    make = lambda: E.init_state(config, slots, max_len, stop_ids, dtype)  # noqa: E731
    return jax.jit(make, out_shardings=state_shardings(jax.eval_shape(make), mesh))
