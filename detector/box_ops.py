"""Box geometry on xyxy tensors: overlaps (IoU, GIoU, DIoU) and the point <-> distance coding.

Numerics follow mmdetection's bbox_overlaps (union and enclosing area clamped at eps = 1e-6) so
losses and assignments match its values."""

from __future__ import annotations

import torch

EPS = 1e-6


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """[N, 4] x [M, 4] -> IoU [N, M]."""
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - overlap
    return overlap / union.clamp(min=EPS)


def aligned_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """[N, 4] x [N, 4] -> IoU [N] of corresponding rows."""
    return _aligned(boxes1, boxes2)[0]


def aligned_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """[N, 4] x [N, 4] -> generalised IoU [N] of corresponding rows."""
    iou, union = _aligned(boxes1, boxes2)
    enclose_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    enclose_area = (enclose_wh[:, 0] * enclose_wh[:, 1]).clamp(min=EPS)
    return iou - (enclose_area - union) / enclose_area


def _aligned(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = (box_area(boxes1) + box_area(boxes2) - overlap).clamp(min=EPS)
    return overlap / union, union


def pairwise_diou(boxes1: torch.Tensor, boxes2: torch.Tensor, official: bool = False) -> torch.Tensor:
    """[N, 4] x [M, 4] -> DIoU [N, M] = IoU - (centre distance^2 / enclosing diagonal^2).

    official=True reproduces the LD authors' variant used to select the VLR: the overlap term is
    intersection / area(boxes1) instead of the IoU (boxes1 are the anchors there)."""
    return broadcast_diou(boxes1[:, None], boxes2[None, :], official)


def broadcast_diou(boxes1: torch.Tensor, boxes2: torch.Tensor, official: bool = False) -> torch.Tensor:
    """DIoU of boxes [..., 4] broadcast against boxes [..., 4] (pairwise_diou's formula)."""
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    area1 = box_area(boxes1)
    if official:
        overlap_term = overlap / area1.clamp(min=EPS)
    else:
        overlap_term = overlap / (area1 + box_area(boxes2) - overlap).clamp(min=EPS)
    rho2 = (((boxes1[..., :2] + boxes1[..., 2:]) / 2 - (boxes2[..., :2] + boxes2[..., 2:]) / 2) ** 2).sum(-1)
    enclose_wh = torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])
    return overlap_term - rho2 / (enclose_wh**2).sum(-1).clamp(min=EPS)


def distance_to_box(points: torch.Tensor, dist_ltrb: torch.Tensor,
                    max_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Points [N, 2] and distances (left, top, right, bottom) [N, 4] -> boxes [N, 4], optionally
    clipped to an image of size max_hw = (h, w). Units are whatever the inputs share."""
    x1 = points[:, 0] - dist_ltrb[:, 0]
    y1 = points[:, 1] - dist_ltrb[:, 1]
    x2 = points[:, 0] + dist_ltrb[:, 2]
    y2 = points[:, 1] + dist_ltrb[:, 3]
    if max_hw is not None:
        h, w = max_hw
        x1, x2 = x1.clamp(0, w), x2.clamp(0, w)
        y1, y2 = y1.clamp(0, h), y2.clamp(0, h)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def box_to_distance(points: torch.Tensor, boxes: torch.Tensor, max_dist: float | None = None,
                    eps: float = 0.1) -> torch.Tensor:
    """Inverse coding: points [N, 2], boxes [N, 4] -> (l, t, r, b) [N, 4], clamped to
    [0, max_dist - eps] when max_dist is given (the last DFL bin needs a right neighbour)."""
    dist = torch.stack(
        [points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1],
         boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]],
        dim=-1,
    )
    if max_dist is not None:
        dist = dist.clamp(min=0, max=max_dist - eps)
    return dist
