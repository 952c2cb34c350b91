"""All training losses of a batch with one weight per key, applied here and nowhere else.

The student's head outputs are flattened into rows (each image's own locations, the cache's row
order), ATSS assigns them, and the GFL task losses follow. Every value returned is weighted and
the total is their sum."""

from __future__ import annotations

import torch

from detector.gfl_loss import assign_batch, flatten_rows, gfl_losses
from distill.config import LossConfig


def compute_losses(cls_logits_per_level: list[torch.Tensor], box_logits_per_level: list[torch.Tensor],
                   level_hw_per_image: list[tuple], gt_boxes_per_image: list[torch.Tensor],
                   gt_labels_per_image: list[torch.Tensor], cfg: LossConfig, num_classes: int,
                   reg_max: int, strides: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """-> {"loss_qfl", "loss_giou", "loss_dfl", "loss"} (weighted; "loss" is the sum)."""
    cls_rows = flatten_rows(cls_logits_per_level, level_hw_per_image)  # [N, C]
    box_rows = flatten_rows(box_logits_per_level, level_hw_per_image)  # [N, 4(n+1)]
    assign = assign_batch(level_hw_per_image, gt_boxes_per_image, gt_labels_per_image, strides, num_classes)
    gfl = gfl_losses(cls_rows, box_rows, assign, reg_max)
    weights = {"loss_qfl": cfg.qfl_weight, "loss_giou": cfg.giou_weight, "loss_dfl": cfg.dfl_weight}
    losses = {k: weights[k] * v for k, v in gfl.losses.items()}
    losses["loss"] = sum(losses.values())
    return losses
