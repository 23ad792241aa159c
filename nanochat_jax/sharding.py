"""Meshes, the logical-axis rules table, and shardings for params, optimizer state, batches.

One mesh with axes ("data", "fsdp", "model") covers every layout: pure data parallel
(data=N), ZeRO-3 style FSDP (fsdp=N: params, grads and optimizer state split, batch split
too) and Megatron-style tensor parallel (model=N: heads and MLP columns split). The model
declares every parameter's logical axis names (model.param_axes); RULES maps them to mesh
axes, and Flax's resolver drops a mesh axis already used by an earlier dimension.

Multi-host: `initialize_distributed` joins the processes, each process feeds only its
rows of the batch, and `global_batch` assembles the global array.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nanochat_jax.config import GPTConfig

AXES = ("data", "fsdp", "model")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data and fsdp
RULES = (
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("ve_vocab", "fsdp"),  # value-embedding tables: rows over fsdp, columns (kv heads) over model
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
)


# ---- meshes ------------------------------------------------------------------------------

def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """'data=-1,fsdp=2,model=2' → {'data': 2, 'fsdp': 2, 'model': 2} on 8 devices (-1 = the rest)."""
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(f"bad mesh spec {spec!r}: {part!r} is not <axis>=<size> with axis in {AXES}")
        if name in seen:
            raise ValueError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} must be an integer or -1") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} must be >= 1 or -1 (the rest)")
        seen.add(name)
    free = [a for a in AXES if sizes[a] == -1]
    if len(free) > 1:
        raise ValueError(f"bad mesh spec {spec!r}: only one axis may be -1, got {free}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh {spec!r}: {n_devices} devices are not divisible by the fixed axes' product {fixed}")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(f"mesh {spec!r} covers {fixed} devices but there are {n_devices}; "
                         f"make the sizes multiply to {n_devices} or set one axis to -1 (e.g. data=-1)")
    return sizes


def make_mesh(spec: str = "data=-1", devices=None) -> Mesh:
    """A mesh over all global devices (Auto axes: XLA propagates shardings inside jit).

    On multi-slice TPU the data axis spans slices (DCN), fsdp/model stay inside a slice (ICI).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if n_slices > 1:
        if sizes["data"] % n_slices:
            raise ValueError(f"mesh {spec!r}: data={sizes['data']} must be a multiple of the {n_slices} TPU slices")
        ici = (sizes["data"] // n_slices, sizes["fsdp"], sizes["model"])
        arr = mesh_utils.create_hybrid_device_mesh(ici, (n_slices, 1, 1), devices)
    else:
        try:
            arr = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):  # no topology info: plain order
            arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def validate(config: GPTConfig, mesh: Mesh, batch_size: int | None = None) -> None:
    """Fail fast, naming the flag to change, when a dimension does not split evenly."""
    fsdp, model = mesh.shape["fsdp"], mesh.shape["model"]
    checks = [
        (config.n_head % model, f"n_head={config.n_head} is not divisible by model={model}: choose model dividing the head count"),
        (config.n_kv_head % model, f"n_kv_head={config.n_kv_head} is not divisible by model={model}"),
        ((4 * config.n_embd) % model, f"MLP width {4 * config.n_embd} is not divisible by model={model}"),
        (config.padded_vocab_size % model, f"padded vocab {config.padded_vocab_size} is not divisible by model={model}"),
        (config.n_embd % fsdp, f"n_embd={config.n_embd} is not divisible by fsdp={fsdp}: change fsdp or --depth/--aspect-ratio"),
        (config.padded_vocab_size % fsdp, f"padded vocab {config.padded_vocab_size} is not divisible by fsdp={fsdp}"),
    ]
    if batch_size is not None:
        n = mesh.shape["data"] * fsdp
        checks.append((batch_size % n, f"batch size {batch_size} is not divisible by data*fsdp={n}: "
                                       f"change --device-batch-size or the mesh"))
    errors = [msg for bad, msg in checks if bad]
    if errors:
        raise ValueError(f"model {config} does not fit mesh {dict(mesh.shape)}: " + "; ".join(errors))


# ---- shardings -----------------------------------------------------------------------------

def logical_to_mesh(spec: P) -> P:
    return nn.logical_to_mesh_axes(tuple(spec), RULES)


def param_shardings(param_axes, mesh: Mesh):
    """NamedShardings for every parameter, from its logical axes (model.param_axes) and RULES."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_mesh(spec)), param_axes,
                        is_leaf=lambda x: isinstance(x, P))


def state_shardings(state_shapes, params_shardings, mesh: Mesh):
    """Shardings for an optimizer state: each leaf follows the parameter it belongs to.

    A state leaf belongs to the parameter whose path ends its own path (optax nests
    per-parameter trees inside its state NamedTuples). Same shape → the parameter's
    sharding; a reduced statistic (a size-1 dimension) → the same with that dim unsplit;
    counters and anything else → replicated.
    """
    by_path = {tuple(k.key for k in path): s for path, s in jax.tree_util.tree_leaves_with_path(params_shardings)}
    replicated = NamedSharding(mesh, P())

    def leaf(path, x):
        keys = tuple(getattr(k, "key", None) for k in path)
        for n in range(len(keys), 0, -1):
            s = by_path.get(keys[-n:])
            if s is not None and len(s.spec) == x.ndim:
                return NamedSharding(mesh, unsplit_size_one(s.spec, x.shape))
        return replicated

    return jax.tree_util.tree_map_with_path(leaf, state_shapes)


def unsplit_size_one(spec: P, shape) -> P:
    """spec for an array of `shape` beside the parameter it belongs to: every size-1 dimension
    unsplit (a reduced statistic, a per-column scale row)."""
    return P(*(None if n == 1 else ax for n, ax in zip(shape, tuple(spec) + (None,) * len(shape))))


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """(…, B, T) token arrays: B over data+fsdp; `leading` unsplit dims before B (micro-steps)."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH, None))


def constrain_activations(x_BTC):
    """Pin block-boundary activations to batch-split, width-whole, when a mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
        return x_BTC
    return jax.lax.with_sharding_constraint(x_BTC, P(BATCH, *([None] * (x_BTC.ndim - 1))))


# ---- multi-host ------------------------------------------------------------------------------

def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join the other processes of a multi-host run; a no-op for a single process.

    Explicit flags (or NANOCHAT_COORDINATOR / NANOCHAT_NUM_PROCESSES / NANOCHAT_PROCESS_ID)
    win; NANOCHAT_AUTO_DISTRIBUTED=1 (set by runs/tpu_pod.sh) or a multi-task SLURM job lets
    JAX discover the cluster itself.
    """
    coordinator = coordinator or os.environ.get("NANOCHAT_COORDINATOR")
    if num_processes is None and "NANOCHAT_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["NANOCHAT_NUM_PROCESSES"])
    if process_id is None and "NANOCHAT_PROCESS_ID" in os.environ:
        process_id = int(os.environ["NANOCHAT_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id too")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=300)
    elif os.environ.get("NANOCHAT_AUTO_DISTRIBUTED") == "1" or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def is_main_process() -> bool:
    """Only process 0 logs, samples and writes metadata."""
    return jax.process_index() == 0


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...], dim: int = 0) -> slice:
    """The rows (along `dim`) of the global batch that this process's devices hold, i.e. what it loads."""
    idx = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [(i[dim].start or 0) for i in idx]
    stops = [(i[dim].stop if i[dim].stop is not None else global_shape[dim]) for i in idx]
    return slice(min(starts), max(stops))


def global_batch(local_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assemble the global batch from each process's rows (the batch dim is sharding's split dim)."""
    return jax.make_array_from_process_local_data(sharding, local_rows)
