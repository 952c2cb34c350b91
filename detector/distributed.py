"""The little of torch.distributed the math needs: averaging a statistic over ranks (mmdet's
reduce_mean), which is the identity in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (no gradient flows through the reduction)."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value.div_(dist.get_world_size()))
    return value
