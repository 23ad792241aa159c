"""PyTorch reference of nanochat's model: the oracle the JAX port is tested against."""

from nanochat_jax.torch_ref.generate import generate
from nanochat_jax.torch_ref.model import GPT
from nanochat_jax.torch_ref.optim import (
    MuonAdamW,
    apply_schedules,
    lr_multiplier,
    muon_momentum,
    muon_weight_decay,
    setup_optimizer,
)

__all__ = [
    "GPT",
    "generate",
    "MuonAdamW",
    "setup_optimizer",
    "apply_schedules",
    "lr_multiplier",
    "muon_momentum",
    "muon_weight_decay",
]
