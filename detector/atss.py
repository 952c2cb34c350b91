"""ATSS assignment (Adaptive Training Sample Selection, topk = 9), as GFL trains with it.

For each GT: on every level take the k anchors whose centres are closest to the GT centre; the
GT's IoU threshold is mean + std of those candidates' IoUs; a candidate is positive when its IoU
reaches the threshold and its centre lies inside the GT. An anchor positive for several GTs takes
the one with the highest IoU. The per-GT thresholds are returned too: VLR selection reuses them.

assign_batch runs it for every image of a batch and lays the result out in the batch's rows
(detector.rows): what the GFL losses, the distillation terms and region selection read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from detector.box_ops import pairwise_iou
from detector.priors import anchor_centres, image_priors

TOPK = 9
_NEG_INF = -1e8


@dataclass
class AtssResult:
    gt_index: torch.Tensor  # [N] long: index of the assigned GT, -1 for negatives
    thresholds: torch.Tensor  # [G] the adaptive IoU threshold of each GT (mean + std of candidates)
    ious: torch.Tensor  # [N, G] IoU of every anchor with every GT


def atss_assign(anchors: torch.Tensor, level_counts: list[int], gt_boxes: torch.Tensor, topk: int = TOPK) -> AtssResult:
    """anchors [N, 4] of one image (level-major), anchors per level, gt_boxes [G, 4] -> AtssResult."""
    num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
    ious = pairwise_iou(anchors, gt_boxes)  # [N, G]
    gt_index = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gts == 0 or num_anchors == 0:
        return AtssResult(gt_index, ious.new_zeros((num_gts,)), ious)

    gt_centres = anchor_centres(gt_boxes)  # [G, 2]
    centres = anchor_centres(anchors)  # [N, 2]
    distances = (centres[:, None, :] - gt_centres[None, :, :]).pow(2).sum(-1).sqrt()  # [N, G]

    candidates = []  # per level [k_l, G] anchor indices
    start = 0
    for count in level_counts:
        k = min(topk, count)
        if k > 0:
            _, idx = distances[start:start + count].topk(k, dim=0, largest=False)
            candidates.append(idx + start)
        start += count
    candidate_idx = torch.cat(candidates, dim=0)  # [K, G]
    gt_arange = torch.arange(num_gts, device=anchors.device)
    candidate_ious = ious[candidate_idx, gt_arange]  # [K, G]
    thresholds = candidate_ious.mean(0) + candidate_ious.std(0)  # unbiased std, as the paper's code
    is_pos = candidate_ious >= thresholds[None, :]

    # The anchor centre must lie inside the GT (by more than 0.01 px on every side).
    cand_centres = centres[candidate_idx]  # [K, G, 2]
    inside = torch.stack(
        [
            cand_centres[..., 0] - gt_boxes[:, 0],
            cand_centres[..., 1] - gt_boxes[:, 1],
            gt_boxes[:, 2] - cand_centres[..., 0],
            gt_boxes[:, 3] - cand_centres[..., 1],
        ],
        dim=-1,
    ).min(dim=-1).values > 0.01
    is_pos &= inside

    # Resolve anchors positive for several GTs by the highest IoU (first GT on ties).
    masked = torch.full((num_gts, num_anchors), _NEG_INF, dtype=ious.dtype, device=ious.device)
    pos_gt = gt_arange.expand_as(candidate_idx)[is_pos]
    pos_anchor = candidate_idx[is_pos]
    masked[pos_gt, pos_anchor] = ious[pos_anchor, pos_gt]
    best_iou, best_gt = masked.t().max(dim=1)
    assigned = best_iou != _NEG_INF
    gt_index[assigned] = best_gt[assigned]
    return AtssResult(gt_index, thresholds, ious)


@dataclass
class BatchAssignment:
    anchors: torch.Tensor  # [N, 4] pixels
    strides: torch.Tensor  # [N] float
    levels: torch.Tensor  # [N] long, 0 = P3
    images: torch.Tensor  # [N] long, index in the batch
    labels: torch.Tensor  # [N] long, num_classes for negatives
    pos: torch.Tensor  # [P] long, row indices of the ATSS positives
    pos_gt_boxes: torch.Tensor  # [P, 4] pixels
    rows_per_image: list[int]
    gt_boxes_per_image: list[torch.Tensor]  # [G_i, 4] pixels
    thresholds_per_image: list[torch.Tensor]  # [G_i] ATSS IoU thresholds (VLR needs them)
    ious_per_image: list[torch.Tensor]  # [N_i, G_i] anchor-GT IoU
    num_levels: int = 5

    @property
    def num_rows(self) -> int:
        return self.anchors.shape[0]


def assign_batch(level_hw_per_image: list[tuple], gt_boxes_per_image: list[torch.Tensor],
                 gt_labels_per_image: list[torch.Tensor], strides: tuple[int, ...], num_classes: int) -> BatchAssignment:
    device = gt_boxes_per_image[0].device
    parts = {k: [] for k in ("anchors", "strides", "levels", "images", "labels", "pos", "pos_gt")}
    rows_per_image, thresholds, ious_per_image = [], [], []
    offset = 0
    for i, (level_hw, gt_boxes, gt_labels) in enumerate(zip(level_hw_per_image, gt_boxes_per_image, gt_labels_per_image)):
        anchors, stride_rows, level_rows = image_priors(level_hw, strides, device)
        result = atss_assign(anchors, [h * w for h, w in level_hw], gt_boxes)
        n = anchors.shape[0]
        labels = torch.full((n,), num_classes, dtype=torch.long, device=device)
        pos = (result.gt_index >= 0).nonzero().squeeze(1)
        labels[pos] = gt_labels[result.gt_index[pos]]
        parts["anchors"].append(anchors)
        parts["strides"].append(stride_rows)
        parts["levels"].append(level_rows)
        parts["images"].append(torch.full((n,), i, dtype=torch.long, device=device))
        parts["labels"].append(labels)
        parts["pos"].append(pos + offset)
        parts["pos_gt"].append(gt_boxes[result.gt_index[pos]])
        rows_per_image.append(n)
        thresholds.append(result.thresholds)
        ious_per_image.append(result.ious)
        offset += n
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return BatchAssignment(
        anchors=cat["anchors"], strides=cat["strides"], levels=cat["levels"], images=cat["images"],
        labels=cat["labels"], pos=cat["pos"], pos_gt_boxes=cat["pos_gt"].reshape(-1, 4),
        rows_per_image=rows_per_image, gt_boxes_per_image=list(gt_boxes_per_image),
        thresholds_per_image=thresholds, ious_per_image=ious_per_image, num_levels=len(strides),
    )
