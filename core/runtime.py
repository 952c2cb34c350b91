"""Where a command runs: the device rule, the autocast context and the progress bar, shared by every stage."""

from __future__ import annotations

import functools
import sys
from contextlib import nullcontext

import torch
from tqdm import tqdm

from core.domains import Domain
from core.errors import UserError

AMP_MODES = ("auto", "off", "bf16", "fp16")


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device a process computes on, for its student and (online) teacher alike: auto = cuda
    when available. Under torchrun (local_rank given) a CUDA process takes its own GPU,
    cuda:LOCAL_RANK, whatever index was asked for."""
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
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{device} was asked for but this machine has {torch.cuda.device_count()} GPU(s) "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); choose one of those")
    return device


@functools.cache
def note_amp_ignored(amp: str) -> None:
    """One line on stderr, once per setting: an explicit --amp that a CPU run does not apply."""
    print(f"note: --amp {amp} applies on CUDA only; on this CPU the run computes in fp32", file=sys.stderr)


def compute_precision(device: torch.device, amp: str) -> str:
    """The arithmetic a forward under autocast_for(device, amp) does: bf16 or fp16 (autocast on
    CUDA), tf32 (CUDA fp32 with cuDNN's TF32 convolutions, torch's default) or fp32. Outputs of
    different precisions differ far more than rounding, so a cache records its own."""
    if device.type != "cuda":
        return "fp32"
    if amp != "off":
        return "fp16" if amp == "fp16" else "bf16"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def autocast_for(device: torch.device, amp: str):
    """The autocast context of an amp setting: auto = bf16 on CUDA, nothing on CPU (where an
    explicit bf16/fp16 is noted once on stderr rather than silently dropped)."""
    if device.type != "cuda" or amp == "off":
        if device.type != "cuda" and amp in ("bf16", "fp16"):
            note_amp_ignored(amp)
        return nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


# Into a file or pipe (nohup, a job queue, a cluster log) a bar that redraws 10 times a second fills
# the log with carriage-return frames; there it prints at most one line a minute.
LOG_INTERVAL_S = 60.0


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm on stderr: redrawn live in a terminal, one line per LOG_INTERVAL_S when stderr is not one
    (where a finished bar stays: tqdm would blank a leave=False bar with a line of spaces)."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
        kwargs.setdefault("ncols", 100)
        kwargs.pop("dynamic_ncols", None)
        kwargs["leave"] = True
    return tqdm(iterable, file=sys.stderr, **kwargs)


class Device(Domain):
    """auto, cpu, cuda or cuda:N."""

    allowed = "auto, cpu, cuda or cuda:N"
    metavar = "auto|cpu|cuda|cuda:N"

    def valid(self, value) -> bool:
        if not isinstance(value, str):
            return False
        if value in ("auto", "cpu", "cuda"):
            return True
        prefix, _, index = value.partition(":")
        return prefix == "cuda" and index.isdigit() and index.isascii()


class DeviceList(Domain):
    """GPU indices 0,1,2 or auto; empty for none (the CPU)."""

    allowed = "GPU indices such as 0,1,2, or auto"
    metavar = "0,1,..|auto"

    def valid(self, value) -> bool:
        if not isinstance(value, str):
            return False
        if value in ("", "auto"):
            return True
        parts = [p.strip() for p in value.split(",")]
        return all(p.isdigit() and p.isascii() for p in parts) and len(set(parts)) == len(parts)
