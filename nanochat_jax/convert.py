"""nanochat state_dicts and checkpoints ↔ our JAX params (docs/numerics.md#checkpoint-interop).

A nanochat state_dict is a flat map of torch names to (out, in) tensors; our params are
a nested dict of (in, out) kernels. `NAME_MAP` is the whole correspondence; every
Linear is transposed, embeddings and scalars are not. Conversion keeps each tensor's
dtype, so params → state_dict → params is bit-exact (bf16 included).

Checkpoint directories hold `model_{step:06d}.pt` (torch.save of the state_dict) and
`meta_{step:06d}.json` (model_config and run metadata). Reading or writing .pt files
needs torch (the `torch` extra); the name mapping itself does not.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from nanochat_jax.config import GPTConfig
from nanochat_jax.fileio import atomic_write

_ORIG_MOD = "_orig_mod."  # prefix torch.compile adds; upstream's loader strips it too


def name_map(config: GPTConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """nanochat state_dict key → (path in our params, transpose?)."""
    m = {
        "transformer.wte.weight": (("wte",), False),
        "lm_head.weight": (("lm_head", "kernel"), True),
        "resid_lambdas": (("resid_lambdas",), False),
        "x0_lambdas": (("x0_lambdas",), False),
        "smear_gate.weight": (("smear_gate", "kernel"), True),
        "smear_lambda": (("smear_lambda",), False),
        "backout_lambda": (("backout_lambda",), False),
    }
    for i in range(config.n_layer):
        blk = f"transformer.h.{i}"
        linears = [("attn", "c_q"), ("attn", "c_k"), ("attn", "c_v"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")]
        if config.has_ve(i):
            linears.append(("attn", "ve_gate"))
            m[f"value_embeds.{i}.weight"] = ((f"ve_{i}",), False)
        for sub, lin in linears:
            m[f"{blk}.{sub}.{lin}.weight"] = ((f"h_{i}", sub, lin, "kernel"), True)
    return m


def _expected_shapes(config: GPTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from nanochat_jax.model import init_params  # lazy: keeps this module light to import

    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0), "float32"))
    return {tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def _to_numpy(t) -> np.ndarray:
    """torch tensor or array-like → numpy, bit-exact for bf16 (numpy has no native bf16)."""
    if hasattr(t, "detach"):  # torch.Tensor, without importing torch
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import torch

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)


def params_from_state_dict(state_dict, config: GPTConfig) -> dict:
    """A nanochat state_dict (torch tensors or arrays) → our params (numpy, dtypes kept)."""
    state_dict = {k.removeprefix(_ORIG_MOD): v for k, v in state_dict.items()}
    mapping = name_map(config)
    missing = sorted(set(mapping) - set(state_dict))
    extra = sorted(set(state_dict) - set(mapping))
    if missing or extra:
        raise ValueError(f"state_dict does not match {config}: missing keys {missing}, unexpected keys {extra}")
    shapes = _expected_shapes(config)
    params: dict = {}
    for key, (path, transpose) in mapping.items():
        a = _to_numpy(state_dict[key])
        if transpose:
            a = a.T
        if a.shape != shapes[path]:
            want = shapes[path][::-1] if transpose else shapes[path]
            raise ValueError(f"state_dict key {key!r} has shape {tuple(a.shape[::-1] if transpose else a.shape)}, "
                             f"expected {tuple(want)} for {config}")
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(a)
    return params


def state_dict_from_params(params, config: GPTConfig) -> dict[str, np.ndarray]:
    """Our params → a nanochat state_dict of numpy arrays in torch's (out, in) layout."""
    flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    mapping = name_map(config)
    missing = sorted("/".join(path) for path, _ in mapping.values() if path not in flat)
    extra = sorted("/".join(path) for path in set(flat) - {path for path, _ in mapping.values()})
    if missing or extra:
        raise ValueError(f"params do not match {config}: missing {missing}, unexpected {extra}")
    out = {}
    for key, (path, transpose) in mapping.items():
        a = np.asarray(flat[path])
        out[key] = np.ascontiguousarray(a.T if transpose else a)
    return out


# ---- checkpoint directories ---------------------------------------------------------------

def torch_available() -> bool:
    """Whether the upstream .pt format can be written here (it needs torch)."""
    return importlib.util.find_spec("torch") is not None


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("reading/writing nanochat .pt checkpoints needs torch: pip install 'nanochat-jax[torch]'") from e
    return torch


def _to_torch(a: np.ndarray):
    torch = _torch()
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def find_checkpoint(path, step: int | None = None) -> tuple[Path, int]:
    """Resolve a checkpoint directory and step like upstream's loader.

    `path` is a directory with model_*.pt files, or a parent of `d<N>` tag directories
    (the largest depth wins, else the most recently modified). step=None → the highest.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not list(path.glob("model_*.pt")):
        subdirs = [d for d in path.iterdir() if d.is_dir() and list(d.glob("model_*.pt"))]
        if not subdirs:
            raise FileNotFoundError(f"no model_*.pt checkpoints in {path} or its subdirectories")
        tagged = [d for d in subdirs if re.fullmatch(r"d\d+", d.name)]
        path = max(tagged, key=lambda d: int(d.name[1:])) if tagged else max(subdirs, key=lambda d: d.stat().st_mtime)
    steps = sorted(int(m.group(1)) for f in path.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", f.name)))
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no model_{step:06d}.pt in {path} (available steps: {steps})")
    return path, step


def load_nanochat_checkpoint(path, step: int | None = None, dtype=None) -> tuple[dict, GPTConfig, dict]:
    """Load `model_XXXXXX.pt` + `meta_XXXXXX.json` → (params, config, meta).

    Matrices and scalars become fp32 masters; wte and value embeddings are cast to the
    compute dtype (docs/numerics.md#dtypes; upstream likewise upcasts bf16 tables to fp32 on CPU).
    """
    from nanochat_jax.common import resolve_dtype

    torch = _torch()
    ckpt_dir, step = find_checkpoint(path, step)
    meta_path = ckpt_dir / f"meta_{step:06d}.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing: it holds the model_config needed to read model_{step:06d}.pt")
    meta = json.loads(meta_path.read_text())
    if "model_config" not in meta:
        raise ValueError(f"{meta_path} has no 'model_config'")
    config = GPTConfig.from_dict(meta["model_config"])
    model_path = ckpt_dir / f"model_{step:06d}.pt"
    try:
        state_dict = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {model_path} as a torch state_dict ({type(e).__name__}: {e}); "
                         "the file is truncated or not a nanochat checkpoint") from e
    # Checkpoints from before resid/x0 lambdas existed load with neutral values, as upstream.
    state_dict.setdefault("resid_lambdas", torch.ones(config.n_layer))
    state_dict.setdefault("x0_lambdas", torch.zeros(config.n_layer))
    params = params_from_state_dict(state_dict, config)
    cd = resolve_dtype(dtype)
    embed_keys = {"wte"} | {f"ve_{i}" for i in config.ve_layers}
    params = {k: (v.astype(cd) if k in embed_keys else jax.tree.map(lambda a: a.astype(np.float32), v))
              for k, v in params.items()}
    return params, config, meta


def export_nanochat_checkpoint(params, config: GPTConfig, out_dir, step: int = 0, meta: dict | None = None) -> Path:
    """Write params as nanochat's model_{step}.pt + meta_{step}.json (loadable upstream).

    Tensors keep their dtypes: on an accelerator wte/VE are bf16 like upstream's; on CPU
    they are fp32, which upstream also accepts (it upcasts on CPU anyway).
    """
    torch = _torch()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: _to_torch(v) for k, v in state_dict_from_params(jax.device_get(params), config).items()}
    full_meta = {"step": step, "model_config": config.to_dict(), **(meta or {})}
    atomic_write(out_dir / f"model_{step:06d}.pt", lambda f: torch.save(state_dict, f))
    atomic_write(out_dir / f"meta_{step:06d}.json", lambda f: f.write(json.dumps(full_meta, indent=2).encode()))
    return out_dir
