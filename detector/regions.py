"""Where distillation applies: the Main region (ATSS positives) and the Valuable Localization
Region (VLR), as the LD paper's official code selects it. Shared by the student's criterion and by
region-sparse teacher caches, which store only these rows.

VLR, per image over all anchors of all levels: anchor a is in GT g's band when
gamma x thr_g <= DIoU(a, g) < thr_g, thr_g being the ATSS threshold of g. In several bands, the
GT with the highest IoU wins and the anchor's weight is that IoU. There is no centre-inside test and
positives are not excluded. With iou="official" the DIoU's overlap term is intersection /
area(anchor), the official code's quirk that produced the published numbers; "diou" is true DIoU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from detector.atss import BatchAssignment, assign_batch
from detector.box_ops import broadcast_diou, pairwise_diou

VLR_IOUS = ("official", "diou")  # the authors' DIoU variant (intersection / anchor area), true DIoU


@dataclass
class Region:
    rows: torch.Tensor  # [M] row indices into the batch rows
    weights: torch.Tensor  # [M] per-row weight


def vlr_region(assign: BatchAssignment, gamma: float, iou: str = "official") -> Region:
    if not 0 <= gamma <= 1:
        raise ValueError(f"vlr gamma must be in [0, 1], got {gamma}")
    if iou not in VLR_IOUS:
        raise ValueError(f"vlr iou must be official or diou, got {iou!r}")
    if assign.padded is None:
        return _vlr_image_by_image(assign, gamma, iou)
    pad = assign.padded
    # Only anchors that overlap some GT can be in a band: without overlap the DIoU is
    # -(centre distance^2 / diagonal^2) < 0 <= gamma x thr (thr >= 0, gamma >= 0), so the DIoU is
    # computed for those alone (a few percent of the anchors; the same result), the whole batch at once.
    b, a = (pad.valid & (pad.ious > 0).any(dim=2)).nonzero(as_tuple=True)  # [m] image, padded anchor
    diou = broadcast_diou(pad.anchors[a][:, None], pad.gts[b], official=iou == "official")  # [m, G]
    thr = pad.thresholds[b]
    in_band = (diou >= gamma * thr) & (diou < thr) & pad.gt_valid[b]
    near_ious = pad.ious[b, a]
    best_iou, _ = torch.where(in_band, near_ious, torch.full_like(near_ious, -1.0)).max(dim=1)
    keep = best_iou >= 0
    return Region(pad.row_of[b[keep], a[keep]], best_iou[keep])


def _vlr_image_by_image(assign: BatchAssignment, gamma: float, iou: str) -> Region:
    """The same selection for an assignment without the padded layout (built by hand)."""
    rows, weights = [], []
    start = 0
    for n, gt_boxes, thresholds, ious in zip(assign.rows_per_image, assign.gt_boxes_per_image,
                                             assign.thresholds_per_image, assign.ious_per_image):
        if len(gt_boxes):
            near = (ious > 0).any(dim=1).nonzero().squeeze(1)
            diou = pairwise_diou(assign.anchors[start + near], gt_boxes, official=iou == "official")  # [m, G]
            in_band = (diou >= gamma * thresholds[None, :]) & (diou < thresholds[None, :])
            near_ious = ious[near]
            best_iou, _ = torch.where(in_band, near_ious, torch.full_like(near_ious, -1.0)).max(dim=1)
            keep = best_iou >= 0
            rows.append(near[keep] + start)
            weights.append(best_iou[keep])
        start += n
    device = assign.anchors.device
    if not rows:
        return Region(torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device))
    return Region(torch.cat(rows), torch.cat(weights))


def distillation_rows(level_hw: tuple, gt_boxes: torch.Tensor, strides: tuple[int, ...], min_vlr_gamma: float,
                      vlr_iou: str = "official") -> torch.Tensor:
    """Rows of one view that Main LD, Main KD and VLR LD (for any gamma >= min_vlr_gamma) can read:
    the ATSS positives and the VLR band [min_gamma x thr, thr). Sorted indices into the view's
    dense rows. Depends only on the view geometry and its GT boxes, so it is known before the
    teacher runs and the student finds exactly these rows again."""
    labels = torch.zeros(len(gt_boxes), dtype=torch.long)
    assign = assign_batch([level_hw], [gt_boxes], [labels], strides, num_classes=1)
    vlr = vlr_region(assign, min_vlr_gamma, vlr_iou)
    return torch.unique(torch.cat([assign.pos, vlr.rows]))  # sorted


@dataclass(frozen=True)
class TeacherNeeds:
    """What the distillation terms of a run read from its teacher, so that a teacher source can
    refuse before step 1 what it cannot serve (a cache without class logits, a region-sparse
    cache dumped for another VLR)."""

    class_logits: bool  # Main KD (at the positives) or BCKD (everywhere) reads the teacher's class logits
    vlr_gamma: float | None  # VLR LD's band [gamma x thr, thr); None: no VLR LD
    vlr_iou: str = "official"
    every_location: bool = False  # BCKD: class logits and boxes at every location, not only Main and VLR
    box_logits: bool = True  # Main LD or VLR LD: the 68 box logits (at their rows)
