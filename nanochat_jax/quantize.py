"""Weight-only int8 for serving: smaller params, same forward.

Decode at small batch reads every weight once per token, so it is bound by weight bytes, not
FLOPs. quantize_params swaps each matmul kernel (attention q/k/v/proj, MLP, lm_head) for a qwix
QArray: int8 values plus one fp32 scale per output channel (symmetric absmax), 4x fewer bytes
than the fp32 master. Embeddings, value embeddings, the lambdas and the tiny gates (ve_gate,
smear_gate) stay as they are: they are gathers or too small to matter.

qwix's model-level path (quantize_model / PtqProvider) intercepts the dot_generals of a module
it re-runs, and our params are a plain nested dict fed to one functional apply; its array-level
API fits that directly: qwix.quantize on each kernel here, qwix.dot_general in model.Linear's
hook (dot). Activations stay in the compute dtype, so qwix dequantizes the weight into the
matmul: the saving is in bytes read, for accelerators; on XLA:CPU the convert costs more than it
saves (bench/RESULTS.md, "Quantized decode").
"""

import jax
import jax.numpy as jnp
import qwix

MODES = ("int8",)
# The Linear layers whose kernels are quantized (the module names in model.py).
QUANTIZED = frozenset({"c_q", "c_k", "c_v", "c_proj", "c_fc", "lm_head"})


def quantize_params(params: dict, mode: str) -> dict:
    """A copy of params with QUANTIZED kernels as int8 QArrays (scale per output channel)."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)} (or off), got {mode!r}")

    def walk(tree, name):
        if not isinstance(tree, dict):
            return tree
        if name in QUANTIZED and "kernel" in tree:  # kernel (in, out): one scale per out column
            return {**tree, "kernel": qwix.quantize(jnp.asarray(tree["kernel"]), jnp.int8, channelwise_axes=(1,))}
        return {k: walk(v, k) for k, v in tree.items()}

    return walk(params, "")


def dot(x_NC, kernel: qwix.QArray):
    """x (N, in) @ a quantized kernel (in, out), in x's dtype (model.Linear's hook)."""
    return qwix.dot_general(x_NC, kernel.astype(x_NC.dtype), (((1,), (0,)), ((), ())))


def nbytes(params) -> int:
    """Bytes held by all leaves (a QArray counts its int8 values and its scales)."""
    return sum(a.nbytes for a in jax.tree.leaves(params))
