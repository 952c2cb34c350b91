"""Distillation losses on rows of logits. Pure functions; reductions are the caller's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from detector.distributions import distribution_kl


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per row at temperature T, [N, K] x [N, K] -> [N]: T^2 x the mean over
    the K bins (detector.distributions.distribution_kl, in float32)."""
    return distribution_kl(student_logits, teacher_logits, temperature)


def sigmoid_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-class binary KL per row, T^2 x mean over classes: [N, C] x [N, C] -> [N]. The class KD
    for sigmoid detectors that also works with one class (where a softmax over classes is constant)."""
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    p = torch.sigmoid(t)
    # p log p/q + (1-p) log (1-p)/(1-q), with log sigmoid for stability
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return temperature**2 * kl.mean(dim=-1)


def bckd_cls_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """BCKD's binary classification distillation per row: [N, C] x [N, C] -> [N].

    The sum over classes of BCE(s, sigmoid(t)) x |sigmoid(t) - sigmoid(s)|^beta: every class is a
    binary task whose soft target is the teacher's probability (no gradient), modulated as QFL
    modulates, with the factor keeping its gradient through the student's probability."""
    s = student_logits.float()
    p_t = torch.sigmoid(teacher_logits.detach().float())
    bce = F.binary_cross_entropy_with_logits(s, p_t, reduction="none")
    return (bce * (p_t - s.sigmoid()).abs().pow(beta)).sum(dim=-1)


def bckd_box_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """BCKD's per-location weight of its box term: max over classes of |sigmoid(t) - sigmoid(s)|,
    [N, C] x [N, C] -> [N], without gradient (where the two disagree on any class, boxes matter)."""
    with torch.no_grad():
        return (torch.sigmoid(teacher_logits.float()) - torch.sigmoid(student_logits.float())).abs().amax(dim=-1)
