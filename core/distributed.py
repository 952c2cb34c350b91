"""The little of torch.distributed the project needs. Under torchrun (WORLD_SIZE > 1 in the
environment) a command joins the process group (nccl on CUDA, gloo on CPU); in a single process
every helper here is the identity."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str = "auto") -> DistInfo:
    """Join torchrun's process group if there is one; returns this process's place in it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(rank, world, local_rank)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_to_main(items: list) -> list | None:
    """Every rank's list, concatenated in rank order on rank 0 (None elsewhere); one collective."""
    if not is_distributed():
        return items
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, parts, dst=0)
    return [x for part in parts for x in part] if parts is not None else None


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (no gradient flows through the reduction)."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value.div_(dist.get_world_size()))
    return value


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks (logging): every rank gets the same numbers."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def run_on_main(fn, info: DistInfo):
    """Run fn() on rank 0 only and hand its result (or its error) to every rank, so one rank's
    refusal (say, an existing run folder) stops them all instead of leaving them waiting."""
    if not info.enabled:
        return fn()
    box = [None, None]
    if info.is_main:
        try:
            box[0] = fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            box[1] = err
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
