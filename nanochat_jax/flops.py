"""Parameter and FLOP accounting (docs/numerics.md#costs), analytic from the config alone.

nanochat counts these off the live module; we count them off GPTConfig so the training
horizon, batch-size rule and MFU can be computed before (or without) building a model.
Everything is an exact integer. Long windows equal sequence_len, so on contexts past
sequence_len the "L" layers are windowed too (as upstream).
"""

from __future__ import annotations

from nanochat_jax.config import SMEAR_CHANNELS, VE_GATE_CHANNELS, GPTConfig


def _block_matrices(config: GPTConfig, layer: int) -> int:
    """Weights of one transformer.h.{i}: q, k, v, proj, mlp fc/proj and the ve_gate on VE layers."""
    C, kv = config.n_embd, config.kv_dim
    n = config.n_head * config.head_dim * C + 2 * kv * C + C * C + 2 * 4 * C * C
    if config.has_ve(layer):
        n += config.n_kv_head * VE_GATE_CHANNELS
    return n


def num_scaling_params(config: GPTConfig) -> dict:
    """Parameter count by group, nanochat's `num_scaling_params()` (tables use the padded vocab)."""
    Vp, C, L = config.padded_vocab_size, config.n_embd, config.n_layer
    counts = {
        "wte": Vp * C,
        "value_embeds": len(config.ve_layers) * Vp * config.kv_dim,
        "lm_head": Vp * C,
        "transformer_matrices": sum(_block_matrices(config, i) for i in range(L)),
        # resid + x0 lambdas, smear_gate (a 24->1 Linear), smear_lambda, backout_lambda
        "scalars": 2 * L + SMEAR_CHANNELS + 1 + 1,
    }
    counts["total"] = sum(counts.values())
    return counts


def scaling_params(config: GPTConfig) -> int:
    """What the horizon and hyperparameter transfer scale with: block matrices + lm_head."""
    p = num_scaling_params(config)
    return p["transformer_matrices"] + p["lm_head"]


def num_matmul_params(config: GPTConfig) -> int:
    """Every Linear weight (block matrices, ve_gates, smear_gate, padded lm_head); embeddings are lookups."""
    p = num_scaling_params(config)
    return p["transformer_matrices"] + p["lm_head"] + SMEAR_CHANNELS


def _attn_width(config: GPTConfig) -> int:
    return config.n_head * config.head_dim


def estimate_flops(config: GPTConfig) -> int:
    """Training FLOPs per token (fwd+bwd) at T = sequence_len: 6·matmul params + 12·H·hd·min(window, T) per layer."""
    T = config.sequence_len
    attn = sum(12 * _attn_width(config) * min(w, T) for w in config.window_sizes)
    return 6 * num_matmul_params(config) + attn


def summary(config: GPTConfig) -> str:
    """A small table of parameter groups and FLOPs/token, for logs and the CLI."""
    p = num_scaling_params(config)
    rows = [(k, p[k]) for k in ("wte", "value_embeds", "lm_head", "transformer_matrices", "scalars", "total")]
    rows += [("scaling params", scaling_params(config)), ("matmul params", num_matmul_params(config))]
    width = max(len(k) for k, _ in rows)
    lines = [
        f"d{config.n_layer}: C={config.n_embd} H={config.n_head} Hkv={config.n_kv_head} hd={config.head_dim} "
        f"V={config.vocab_size} (padded {config.padded_vocab_size}) T={config.sequence_len} "
        f"windows={config.window_pattern}"
    ]
    lines += [f"  {k:<{width}}  {v:>16,}" for k, v in rows]
    lines.append(f"  {'FLOPs/token':<{width}}  {estimate_flops(config):>16.3e}")
    return "\n".join(lines)
