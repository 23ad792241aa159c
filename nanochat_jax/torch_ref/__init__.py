"""PyTorch reference of nanochat's model: the oracle the JAX port is tested against."""

from nanochat_jax.torch_ref.generate import generate
from nanochat_jax.torch_ref.model import GPT

__all__ = ["GPT", "generate"]
