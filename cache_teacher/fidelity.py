"""How faithful stored box distributions are: KL(fresh || stored) per edge at a distillation
temperature, the LD loss's own measure (detector.distributions.distribution_kl), in float64 so the
storage error is not lost in float32's rounding."""

from __future__ import annotations

import torch

from detector.distributions import distribution_kl


def edge_kl(fresh_logits: torch.Tensor, stored_logits: torch.Tensor, temperature: float = 10.0,
            bins: int = 17) -> torch.Tensor:
    """[n, 4 * bins] x [n, 4 * bins] -> KL per edge [n * 4], in float64."""
    return distribution_kl(stored_logits.reshape(-1, bins), fresh_logits.reshape(-1, bins), temperature,
                           dtype=torch.float64)
