"""Where a command runs: the device rule and the autocast context, shared by every stage."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from detector.errors import UserError

AMP_MODES = ("auto", "off", "bf16", "fp16")


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """auto = cuda when available. Under torchrun (local_rank given) a CUDA process takes its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if local_rank is not None and device.type == "cuda":
        device = torch.device("cuda", local_rank)
    return device


def autocast_for(device: torch.device, amp: str):
    """The autocast context of an amp setting: auto = bf16 on CUDA, nothing on CPU."""
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)
