"""Hyperparameter transfer from d12 (docs/numerics.md#scaling): horizon, batch size, LR and WD scaling.

nanochat tunes at d12 and transfers: the batch grows with the data (Power Lines,
B ∝ D^0.383), LRs scale with sqrt(B/B_REF) and the Muon weight decay follows the
"T_epoch" rule so the decay per epoch of data stays constant. Everything here is a pure
function of the dial (config.Dial) and flags, so train scripts and tests agree on every
number; base_train's plan holds the results and the optimizer reads them (optim.optimizer_for).
"""

from __future__ import annotations

import dataclasses
import math

from nanochat_jax.config import Dial, GPTConfig
from nanochat_jax.flops import estimate_flops, scaling_params

B_REF = 2**19  # tokens per step at d12
REF_DEPTH = 12


def reference_config(dial: Dial) -> GPTConfig:
    """The d12 model of the same family: aspect ratio, head_dim, T, windows and vocab (all kv heads)."""
    return dataclasses.replace(dial, depth=REF_DEPTH, n_kv_head=None).config


def target_tokens(config: GPTConfig, param_data_ratio: float = 12) -> int:
    return int(param_data_ratio * scaling_params(config))


def auto_total_batch_size(dial: Dial, param_data_ratio: float = 12) -> int:
    """B = 2^round(log2(B_REF · (D/D_REF)^0.383)); depends only on depth (both D use one ratio)."""
    d_ref = target_tokens(reference_config(dial), param_data_ratio)
    ratio = target_tokens(dial.config, param_data_ratio) / d_ref
    return 2 ** round(math.log2(B_REF * ratio**0.383))


def num_iterations(config: GPTConfig, total_batch_size: int, *, num_iterations: int = -1,
                   target_flops: float = -1, param_data_ratio: float = 12) -> int:
    """Training horizon: --num-iterations, else --target-flops, else the param:data ratio."""
    if num_iterations > 0:
        return num_iterations
    if target_flops > 0:
        return round(target_flops / (estimate_flops(config) * total_batch_size))
    if param_data_ratio > 0:
        return target_tokens(config, param_data_ratio) // total_batch_size
    raise ValueError("no training horizon: set num_iterations, target_flops or param_data_ratio > 0")


def batch_lr_scale(total_batch_size: int) -> float:
    return math.sqrt(total_batch_size / B_REF)


def dmodel_lr_scale(config: GPTConfig) -> float:
    """(C/768)^-0.5 on the lm_head, wte and value-embedding LRs."""
    return (config.n_embd / 768) ** -0.5


def scaled_weight_decay(dial: Dial, total_batch_size: int, weight_decay: float = 0.28,
                        param_data_ratio: float = 12) -> float:
    """Muon's weight decay for this run: wd · sqrt(B/B_REF) · D_REF/D, with D from the ratio even
    when the horizon is given (optim.muon_weight_decay is its schedule over the steps)."""
    d_ref = target_tokens(reference_config(dial), param_data_ratio)
    return weight_decay * batch_lr_scale(total_batch_size) * d_ref / target_tokens(dial.config, param_data_ratio)
