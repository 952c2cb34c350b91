"""One optimisation step, as the training loop and the throughput benchmark take it.

teacher rows (cache or live teacher) -> student forward under autocast -> every loss of the
batch (distill.criterion) -> backward -> optimizer step. The step reads the losses back to the
host once, as one tensor, and the finite-loss check uses the values read. (On CUDA the losses
still wait on the device where shapes depend on data: the ATSS positives and the VLR band are
selected with nonzero / boolean masks.) Each phase is a torch.profiler record_function range (train_throughput.py
--profile breaks a step down by them; benchmarks/step_phases.py times the same phases from
outside): teacher, forward, losses (assignment, gfl_losses, distillation), backward, optimizer,
readout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from core.errors import UserError
from core.runtime import autocast_for
from distill.criterion import Criterion
from distill.teachers import TeacherSource


@dataclass
class Learner:
    """What a step trains with: the (possibly DDP-wrapped) network, its optimizer and grad scaler,
    the criterion (every loss, built once), and the teacher source (None: plain training)."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: Criterion
    device: torch.device
    amp: str = "auto"
    teacher: TeacherSource | None = None


def train_step(learner: Learner, item, lr: float, iteration: int) -> dict[str, float]:
    """One step on a DataLoader item (a Batch, or (Batch, stored rows) from a cache) at learning
    rate lr; returns the weighted losses as floats (keys of distill.criterion, and "loss")."""
    batch, stored = item if isinstance(item, tuple) else (item, None)
    device = learner.device
    for group in learner.optimizer.param_groups:
        group["lr"] = lr
    with record_function("teacher"):
        teacher_rows = learner.teacher.rows(batch, stored, device) if learner.teacher is not None else None
    with record_function("forward"), autocast_for(device, learner.amp):
        cls_out, box_out = learner.net(batch.images.to(device, non_blocking=True))
    with record_function("losses"):
        losses = learner.criterion(cls_out, box_out, batch, device, teacher_rows)
    with record_function("backward"):
        learner.optimizer.zero_grad(set_to_none=True)
        learner.scaler.scale(losses["loss"]).backward()
    with record_function("readout"):  # the step's one device synchronisation
        values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
    if not torch.isfinite(torch.tensor(values["loss"])):
        raise UserError(f"the loss became {values['loss']} at step {iteration + 1} "
                        f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}); lower --lr")
    with record_function("optimizer"):
        learner.scaler.step(learner.optimizer)
        learner.scaler.update()
    return values
