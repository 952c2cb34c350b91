"""GFL's task losses on a batch: QFL, GIoU and DFL on rows (detector.rows) assigned by ATSS.

Losses are returned unweighted; the criterion applies one weight per key. Normalisation follows
mmdetection's GFLHead: QFL / number of positives, GIoU and DFL / sum of the positives' weights
w_i = max_c sigmoid(cls logit) (each count averaged over ranks, clamped at 1). The positives
count takes every image as having at least one, exactly as mmdetection counts them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.distributed import reduce_mean, world_size
from detector.atss import BatchAssignment
from detector.box_ops import aligned_giou, aligned_iou, box_to_distance, distance_to_box
from detector.distributions import integral
from detector.priors import anchor_centres

DFL_EPS = 0.1  # DFL targets live in [0, reg_max - 0.1] so both neighbouring bins exist


@dataclass
class GFLLossOutput:
    losses: dict[str, torch.Tensor]  # unweighted loss_qfl, loss_giou, loss_dfl
    pos_weights: torch.Tensor  # [P] w_i, detached
    weight_sum: torch.Tensor  # scalar: sum of w_i averaged over ranks, clamped >= 1 globally (GIoU/DFL divisor)
    num_pos: torch.Tensor  # scalar: sum of max(positives, 1) per image, averaged over ranks (QFL divisor)


def pos_geometry(assign: BatchAssignment):
    """Positive anchor centres and GT boxes in stride units (the space GIoU and DFL live in)."""
    pos_strides = assign.strides[assign.pos][:, None]
    centres = anchor_centres(assign.anchors[assign.pos]) / pos_strides
    return centres, assign.pos_gt_boxes / pos_strides


def gfl_losses(cls_rows: torch.Tensor, box_rows: torch.Tensor, assign: BatchAssignment, reg_max: int,
               weight_sum_clamp: bool = True) -> GFLLossOutput:
    """cls_rows [N, C], box_rows [N, 4(n+1)] (student logits, rows as detector.rows.flatten_rows) -> losses.
    weight_sum_clamp=False divides GIoU and DFL by the bare weight sum, as mmdetection's LD head does."""
    cls_rows, box_rows = cls_rows.float(), box_rows.float()
    pos = assign.pos
    # mmdet counts at least one positive per image (its SamplingResult clamps each image's count),
    # so an image without objects still adds 1 to the QFL divisor.
    pos_per_image = torch.bincount(assign.images[pos], minlength=len(assign.rows_per_image))
    num_pos = reduce_mean(pos_per_image.clamp(min=1).sum().to(cls_rows.dtype)).clamp(min=1.0)

    centres, target_boxes = pos_geometry(assign)
    pos_box_logits = box_rows[pos]  # [P, 4(n+1)]
    pred_boxes = distance_to_box(centres, integral(pos_box_logits, reg_max))  # [P, 4] stride units
    pos_weights = cls_rows.detach()[pos].sigmoid().max(dim=1).values  # [P]
    quality = aligned_iou(pred_boxes.detach(), target_boxes)  # QFL's soft target for positives

    loss_qfl = quality_focal_loss(cls_rows, pos, assign.labels[pos], quality).sum() / num_pos
    # Clamped where the global sum would be 1 (mmdet clamps each rank's average at 1, which under
    # torchrun differs from one process while the weights are small; this way N processes = 1).
    weight_sum = reduce_mean(pos_weights.sum()).clamp(min=1.0 / world_size() if weight_sum_clamp else 1e-12)
    if pos.numel() > 0:
        loss_giou = (pos_weights * (1 - aligned_giou(pred_boxes, target_boxes))).sum() / weight_sum
        target_dist = box_to_distance(centres, target_boxes, reg_max, DFL_EPS)  # [P, 4]
        dfl = distribution_focal_loss(pos_box_logits.reshape(-1, reg_max + 1), target_dist.reshape(-1))
        loss_dfl = (dfl.reshape(-1, 4).mean(dim=1) * pos_weights).sum() / weight_sum
    else:  # keep the graph connected so every parameter gets a (zero) gradient
        loss_giou = box_rows.sum() * 0
        loss_dfl = box_rows.sum() * 0
    return GFLLossOutput(
        losses={"loss_qfl": loss_qfl, "loss_giou": loss_giou, "loss_dfl": loss_dfl},
        pos_weights=pos_weights, weight_sum=weight_sum, num_pos=num_pos,
    )


def quality_focal_loss(cls_rows: torch.Tensor, pos: torch.Tensor, pos_labels: torch.Tensor,
                       quality: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """QFL per row [N]: every class is a negative with target 0, except the positive's own class
    whose target is its quality (IoU); the BCE is modulated by |target - sigmoid|^beta."""
    prob = cls_rows.sigmoid()
    loss = F.binary_cross_entropy_with_logits(cls_rows, torch.zeros_like(cls_rows), reduction="none") * prob.pow(beta)
    if pos.numel() > 0:
        pos_logits = cls_rows[pos, pos_labels]
        pos_loss = F.binary_cross_entropy_with_logits(pos_logits, quality, reduction="none")
        loss = loss.index_put((pos, pos_labels), pos_loss * (quality - prob[pos, pos_labels]).abs().pow(beta))
    return loss.sum(dim=1)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL per edge: logits [M, n+1], continuous target [M] in [0, n) -> [M]. The two bins around
    the target share the cross-entropy by linear interpolation."""
    left = target.long()
    right = left + 1
    w_left = right.float() - target
    w_right = target - left.float()
    return (
        F.cross_entropy(logits, left, reduction="none") * w_left
        + F.cross_entropy(logits, right, reduction="none") * w_right
    )
