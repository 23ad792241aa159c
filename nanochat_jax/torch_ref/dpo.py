"""PyTorch reference of the preference losses, written from the papers' formulas (not from the JAX code).

DPO (Rafailov et al., "Direct Preference Optimization", 2023, eq. 7):
    L = −E log σ( β log[π(y_w|x) / π_ref(y_w|x)] − β log[π(y_l|x) / π_ref(y_l|x)] )
with label smoothing ε (conservative DPO): the label is flipped with probability ε, so the loss is
the ε-mixture of the two orientations.
IPO (Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",
2023, eq. 17): L = E ( h − 1/(2τ) )², h = log[π(y_w) π_ref(y_l) / (π(y_l) π_ref(y_w))].

log π(y|x) is the sum of the reply tokens' log-probs; a row's other positions carry target −1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logps(model, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """(B,) Σ_t log p(targets[t] | inputs[:t+1]) over targets != −1, from the GPT's logits."""
    logits = model(inputs_BT).float()
    logp_BTV = F.log_softmax(logits, dim=-1)
    valid = targets_BT != -1
    picked = torch.gather(logp_BTV, -1, targets_BT.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked)).sum(-1)


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss (P,)."""
    z = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(pi_w, pi_l, ref_w, ref_l, tau: float) -> torch.Tensor:
    """Per-pair IPO loss (P,)."""
    h = (pi_w + ref_l) - (pi_l + ref_w)
    return (h - 1.0 / (2.0 * tau)) ** 2


def preference_loss(model, inputs_BT, targets_BT, ref_logps_B, *, loss_type: str = "dpo", beta: float = 0.1,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean pair loss of one batch whose rows alternate chosen (even) and rejected (odd); ref_logps_B
    are the reference's log-probs of the same rows."""
    logps = sequence_logps(model, inputs_BT, targets_BT)
    pi_w, pi_l = logps[0::2], logps[1::2]
    ref_w, ref_l = ref_logps_B[0::2], ref_logps_B[1::2]
    if loss_type == "dpo":
        return dpo_loss(pi_w, pi_l, ref_w, ref_l, beta, label_smoothing).mean()
    if loss_type == "ipo":
        return ipo_loss(pi_w, pi_l, ref_w, ref_l, beta).mean()
    raise ValueError(f"unknown loss_type {loss_type!r}")
