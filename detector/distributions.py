"""GFL's General distribution of a box edge: reg_max + 1 bins whose softmax is the distance from a
location to the edge, in stride units. The one home of what is computed on it: its expectation
(integral; the head's Integral module, decoding, BCKD's boxes and a cache's stored edges use it),
its inverse (logits_of_edges: logits whose expectation is a given edge), and the distillation KL
at a temperature (LD's loss and Main KD's, and a cache's fidelity measure)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def integral(box_logits: torch.Tensor, reg_max: int) -> torch.Tensor:
    """[..., 4(n+1)] -> the expected distance of each edge [..., 4] (softmax . [0, 1, ..., n])."""
    probs = box_logits.reshape(*box_logits.shape[:-1], 4, reg_max + 1).softmax(-1)
    return probs @ torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)


def logits_of_edges(edges: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Expected edge distances [n, 4] -> box logits [n, 4(n+1)] whose expectation they are: each
    edge's mass on the two bins around it (as DFL's target), so anything that decodes box logits
    decodes them to exactly these edges (a cache that stores edges, not distributions)."""
    e = edges.float().clamp(0, reg_max - 1e-4).reshape(-1, 4, 1)
    left = e.floor()
    bins = torch.arange(reg_max + 1, dtype=torch.float32, device=edges.device)
    mass = (1 - (bins - e).abs()).clamp(min=0)  # left + 1 - e at floor(e), e - left at floor(e) + 1
    mass = torch.where((bins == left) | (bins == left + 1), mass, torch.zeros_like(mass))
    return torch.log(mass.clamp(min=1e-30)).clamp(min=-1e4).reshape(len(edges), -1)


def distribution_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """KL(teacher || student) per row at temperature T: [N, K] x [N, K] -> [N].

    T^2 x MEAN over the K bins (not the sum) of p_T (log p_T - log softmax(s / T)), p_T =
    softmax(t / T) without gradient: the LD paper's loss, and mmdetection's
    KnowledgeDistillationKLDivLoss. Teacher input is logits, never probabilities. dtype float64
    measures storage error below float32's rounding (~1e-6 per edge at T = 10)."""
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).mean(dim=-1)
