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

from data.coco import CocoDetection
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
class PaddedBatch:
    """The batch on its largest grid (assign_batch's working layout), kept for region selection."""

    anchors: torch.Tensor  # [Np, 4] the padded grid's anchors, shared by every image
    valid: torch.Tensor  # [B, Np] bool: the location is one of the image's own
    row_of: torch.Tensor  # [B, Np] the batch row of (image, location); -1 where not valid
    gts: torch.Tensor  # [B, G, 4] GT boxes padded with zeros
    gt_valid: torch.Tensor  # [B, G] bool
    ious: torch.Tensor  # [B, Np, G]
    thresholds: torch.Tensor  # [B, G] ATSS thresholds (0 for padding)


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
    padded: PaddedBatch | None = None  # what assign_batch computed on the padded grid

    @property
    def num_rows(self) -> int:
        return self.anchors.shape[0]


def assign_batch(level_hw_per_image: list[tuple], gt_boxes_per_image: list[torch.Tensor],
                 gt_labels_per_image: list[torch.Tensor], strides: tuple[int, ...], num_classes: int,
                 topk: int = TOPK) -> BatchAssignment:
    """ATSS for every image of a batch at once (no per-image loop), laid out in the batch's rows.

    The images' own feature-map sizes may differ: every level is laid on the batch's largest grid,
    whose anchors all images share, and locations outside an image's own size are masked (they are
    no rows of it). The result equals atss_assign run image by image (tests/detector/test_atss.py)."""
    device = gt_boxes_per_image[0].device
    grid = _BatchGrid(level_hw_per_image, strides, device)
    num_images, num_gts = len(level_hw_per_image), max(1, max(len(g) for g in gt_boxes_per_image))
    gts = torch.zeros(num_images, num_gts, 4, device=device)  # [B, G, 4], padded
    gt_valid = torch.zeros(num_images, num_gts, dtype=torch.bool, device=device)
    labels_padded = torch.full((num_images, num_gts), num_classes, dtype=torch.long, device=device)
    for i, (g, lab) in enumerate(zip(gt_boxes_per_image, gt_labels_per_image)):
        gts[i, :len(g)], gt_valid[i, :len(g)], labels_padded[i, :len(g)] = g, True, lab
    ious = pairwise_iou(grid.anchors, gts.reshape(-1, 4)).reshape(-1, num_images, num_gts).permute(1, 0, 2)
    distances = (anchor_centres(grid.anchors)[None, :, None, :] - anchor_centres(gts.reshape(-1, 4)).reshape(
        num_images, 1, num_gts, 2)).pow(2).sum(-1).sqrt()  # [B, Np, G]

    # Candidates per group of images with equal feature-map sizes (usually one or two groups), on
    # their own grid: the same values in the same layout as image by image, so even exact ties of
    # distance (topk picks among them by position) resolve as atss_assign resolves them.
    thresholds = torch.zeros(num_images, num_gts, device=device)
    hits = []  # (image, gt, padded anchor) of every positive candidate
    for sizes, members in _groups(level_hw_per_image).items():
        images = torch.tensor(members, device=device)
        candidates = []
        for local in grid.own_indices(sizes):  # per level [n_l] padded indices, row order
            k = min(topk, local.numel())
            if k > 0:
                order = distances[images][:, local].topk(k, dim=1, largest=False).indices  # [Bg, k, G]
                candidates.append(local[order])
        candidates = torch.cat(candidates, dim=1)  # [Bg, K, G]
        cand_ious = torch.gather(ious[images], 1, candidates)
        thr = cand_ious.mean(1) + cand_ious.std(1)  # unbiased std, as the paper's code
        thresholds[images] = thr
        centres = anchor_centres(grid.anchors)[candidates.reshape(-1)].reshape(*candidates.shape, 2)  # [Bg, K, G, 2]
        g = gts[images][:, None]  # [Bg, 1, G, 4]
        inside = torch.stack([centres[..., 0] - g[..., 0], centres[..., 1] - g[..., 1], g[..., 2] - centres[..., 0],
                              g[..., 3] - centres[..., 1]], dim=-1).min(dim=-1).values > 0.01
        is_pos = (cand_ious >= thr[:, None]) & inside & gt_valid[images][:, None]
        b, _, j = is_pos.nonzero(as_tuple=True)
        hits.append((images[b], j, candidates[is_pos]))

    # An anchor positive for several GTs takes the one with the highest IoU (first GT on ties).
    masked = torch.full((num_images, num_gts, grid.anchors.shape[0]), _NEG_INF, dtype=ious.dtype, device=device)
    b, g, a = (torch.cat(parts) for parts in zip(*hits))
    masked[b, g, a] = ious[b, a, g]
    best_iou, best_gt = masked.max(dim=1)  # [B, Np]
    assigned = best_iou != _NEG_INF
    pos_rows = grid.row_of[assigned]
    order = pos_rows.argsort()
    pos = pos_rows[order]
    pos_image, pos_gt = assigned.nonzero(as_tuple=True)[0][order], best_gt[assigned][order]
    labels = torch.full((grid.num_rows,), num_classes, dtype=torch.long, device=device)
    labels[pos] = labels_padded[pos_image, pos_gt]
    valid = grid.valid
    return BatchAssignment(
        anchors=grid.anchors[grid.anchor_of_row], strides=grid.strides[grid.anchor_of_row],
        levels=grid.levels[grid.anchor_of_row], images=grid.image_of_row, labels=labels, pos=pos,
        pos_gt_boxes=gts[pos_image, pos_gt].reshape(-1, 4), rows_per_image=grid.rows_per_image,
        gt_boxes_per_image=list(gt_boxes_per_image),
        thresholds_per_image=[thresholds[i, :len(g)] for i, g in enumerate(gt_boxes_per_image)],
        ious_per_image=[ious[i][valid[i]][:, :len(g)] for i, g in enumerate(gt_boxes_per_image)],
        num_levels=len(strides), padded=PaddedBatch(grid.anchors, valid, grid.row_of, gts, gt_valid, ious, thresholds),
    )


def assign_view(dataset: CocoDetection, index: int, spec: int = 0, strides: tuple[int, ...] | None = None):
    """ATSS on one view of a dataset from its annotations alone (no network): -> (the view's record,
    its GT boxes in view pixels, the assignment of a batch of that one view)."""
    record = dataset.view_record(index, spec)
    boxes, labels = dataset.view_boxes(index, record)
    assign = assign_batch([record.level_hw], [boxes], [labels], strides or dataset.strides, dataset.num_classes)
    return record, boxes, assign


def _groups(level_hw_per_image: list[tuple]) -> dict[tuple, list[int]]:
    """Images by their feature-map sizes (a tuple of (h, w) per level)."""
    groups: dict[tuple, list[int]] = {}
    for i, level_hw in enumerate(level_hw_per_image):
        groups.setdefault(tuple(tuple(hw) for hw in level_hw), []).append(i)
    return groups


class _BatchGrid:
    """Every level on the batch's largest grid: shared anchors, which images each location belongs
    to, and the batch row of (image, location)."""

    def __init__(self, level_hw_per_image: list[tuple], strides: tuple[int, ...], device):
        level_hw_per_image = [tuple(tuple(hw) for hw in level_hw) for level_hw in level_hw_per_image]
        max_hw = [(max(hw[lvl][0] for hw in level_hw_per_image), max(hw[lvl][1] for hw in level_hw_per_image))
                  for lvl in range(len(strides))]
        self.anchors, self.strides, self.levels = image_priors(tuple(max_hw), strides, device)  # [Np, 4], [Np], [Np]
        self.level_counts = [h * w for h, w in max_hw]
        self.level_starts = [sum(self.level_counts[:lvl]) for lvl in range(len(strides))]
        ys = torch.cat([torch.arange(h, device=device).repeat_interleave(w) for h, w in max_hw])  # [Np]
        xs = torch.cat([torch.arange(w, device=device).repeat(h) for h, w in max_hw])
        sizes = torch.tensor(level_hw_per_image, device=device)  # [B, L, 2]
        own = sizes[:, self.levels]  # [B, Np, 2]: each image's own size of the location's level
        self.valid = (ys[None] < own[..., 0]) & (xs[None] < own[..., 1])  # [B, Np]
        # Row of (image, location): images one after another, each level-major, then y, then x.
        rows_per_level = (sizes[..., 0] * sizes[..., 1])  # [B, L]
        self.rows_per_image = [sum(h * w for h, w in hw) for hw in level_hw_per_image]  # no device round trip
        image_start = torch.cumsum(torch.tensor([0] + self.rows_per_image[:-1], device=device), 0)
        level_start = torch.cumsum(torch.cat([torch.zeros_like(rows_per_level[:, :1]), rows_per_level[:, :-1]], 1), 1)
        self.row_of = (image_start[:, None] + level_start[:, self.levels] + ys[None] * own[..., 1] + xs[None])
        self.row_of = self.row_of.masked_fill(~self.valid, -1)  # [B, Np]
        self.num_rows = int(sum(self.rows_per_image))
        self.max_hw, self.device, self._own = max_hw, device, {}
        self.anchor_of_row = torch.cat([torch.cat(self.own_indices(hw)) for hw in level_hw_per_image])  # [N]
        self.image_of_row = torch.arange(len(level_hw_per_image), device=device).repeat_interleave(
            torch.tensor(self.rows_per_image, device=device))

    def own_indices(self, level_hw: tuple) -> list[torch.Tensor]:
        """Per level, the padded-grid indices of an image's own locations in row order (y, then x)."""
        if level_hw not in self._own:
            self._own[level_hw] = [
                (torch.arange(h, device=self.device)[:, None] * width + torch.arange(w, device=self.device)).reshape(-1)
                + start for start, (h, w), (_, width) in zip(self.level_starts, level_hw, self.max_hw)]
        return self._own[level_hw]
