"""How faithful stored box distributions are: KL(fresh || stored) at a distillation temperature.

The same quantity as the LD loss per edge (distill.losses.distill_kl): T^2 times the MEAN over the
bins of p (log p - log q), with p = softmax(fresh / T) and q = softmax(stored / T). A test keeps
the two definitions equal; cache_teacher cannot import distill (dependency direction)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def edge_kl(fresh_logits: torch.Tensor, stored_logits: torch.Tensor, temperature: float = 10.0,
            bins: int = 17) -> torch.Tensor:
    """[n, 4 * bins] x [n, 4 * bins] -> KL per edge [n * 4], computed in float64: in float32 the
    rounding noise (~1e-6 at T = 10) would hide the fp16 storage error being measured."""
    p_log = F.log_softmax(fresh_logits.double().reshape(-1, bins) / temperature, dim=-1)
    q_log = F.log_softmax(stored_logits.double().reshape(-1, bins) / temperature, dim=-1)
    return temperature**2 * (p_log.exp() * (p_log - q_log)).mean(dim=-1)
