"""nanochat's naive `GPT.generate` (docs/numerics.md#generation): the cache-free decoding reference.

Every step reruns the full forward on the growing sequence, so it is slow but has no
KV-cache logic that could share a bug with the engine it is used to check.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from nanochat_jax.torch_ref.model import GPT


@torch.inference_mode()
def generate(
    model: GPT,
    tokens: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 42,
) -> Iterator[int]:
    """Yield up to max_tokens sampled token ids continuing the batch-1 prompt `tokens`."""
    assert isinstance(tokens, list) and tokens, "tokens must be a non-empty list of ints"
    assert temperature >= 0, "temperature must be >= 0"
    device = model.lm_head.weight.device
    rng = torch.Generator(device=device).manual_seed(seed)
    ids_1T = torch.tensor([tokens], dtype=torch.long, device=device)
    for _ in range(max_tokens):
        logits_1V = model(ids_1T)[:, -1, :]
        if top_k is not None and top_k > 0:
            kth_largest_11 = torch.topk(logits_1V, min(top_k, logits_1V.size(-1))).values[:, -1:]
            logits_1V = logits_1V.masked_fill(logits_1V < kth_largest_11, -float("inf"))
        if temperature > 0:
            probs_1V = F.softmax(logits_1V / temperature, dim=-1)
            next_11 = torch.multinomial(probs_1V, num_samples=1, generator=rng)
        else:
            next_11 = torch.argmax(logits_1V, dim=-1, keepdim=True)
        ids_1T = torch.cat([ids_1T, next_11], dim=1)
        yield next_11.item()
