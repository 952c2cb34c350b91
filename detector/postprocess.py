"""Head outputs -> detections in original image pixels (mmdetection's GFL test recipe):
per level, the top 1000 (location, class) pairs scoring above 0.05; decode; class-aware NMS at
IoU 0.6; keep the best 100 per image. Pure torch (no compiled NMS)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.views import ViewRecord, boxes_to_original
from detector.box_ops import box_area, distance_to_box
from detector.distributions import integral
from detector.priors import anchor_centres, level_priors
from detector.rows import image_level_rows


@dataclass(frozen=True)
class PostprocessConfig:
    score_thr: float = 0.05
    nms_pre: int = 1000  # per level
    iou_thr: float = 0.6
    max_per_img: int = 100


@dataclass
class Detections:
    boxes: torch.Tensor  # [K, 4] xyxy, original image pixels
    scores: torch.Tensor  # [K]
    labels: torch.Tensor  # [K] long, 0-based class index


@torch.no_grad()
def postprocess(cls_logits_per_level: list[torch.Tensor], box_logits_per_level: list[torch.Tensor],
                records: list[ViewRecord], strides: tuple[int, ...], reg_max: int,
                cfg: PostprocessConfig = PostprocessConfig()) -> list[Detections]:
    results = []
    for i, record in enumerate(records):
        boxes_all, scores_all, labels_all = [], [], []
        for cls_map, box_map, stride, (h, w) in zip(
            cls_logits_per_level, box_logits_per_level, strides, record.level_hw
        ):
            scores = image_level_rows(cls_map, i, (h, w)).float().sigmoid()  # [HW, C]
            box_logits = image_level_rows(box_map, i, (h, w)).float()  # [HW, 4(n+1)]
            keep = scores > cfg.score_thr
            flat_scores = scores[keep]
            loc_idx, cls_idx = keep.nonzero(as_tuple=True)
            if flat_scores.numel() > cfg.nms_pre:
                flat_scores, order = flat_scores.topk(cfg.nms_pre)
                loc_idx, cls_idx = loc_idx[order], cls_idx[order]
            centres = anchor_centres(level_priors((h, w), stride, scores.device)[loc_idx])
            dist = integral(box_logits[loc_idx], reg_max) * stride
            boxes_all.append(distance_to_box(centres, dist, max_hw=record.resized_hw))
            scores_all.append(flat_scores)
            labels_all.append(cls_idx)
        boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
        boxes = boxes_to_original(boxes, record)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # mmdet's min_bbox_size = 0
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        keep = batched_nms(boxes, scores, labels, cfg.iou_thr)[: cfg.max_per_img]
        results.append(Detections(boxes[keep], scores[keep], labels[keep]))
    return results


PER_CLASS_FROM = 500  # boxes; below it one NMS over all classes costs less than a loop over them


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_thr: float) -> torch.Tensor:
    """Class-aware greedy NMS; returns kept indices in decreasing score order (ties: index order).
    Boxes of different classes are moved apart so they never overlap (mmdetection's offsets, so the
    IoUs are the same floats); above PER_CLASS_FROM boxes each class is then suppressed on its own,
    which gives the same boxes at a fraction of the O(n^2) overlap work of one NMS over all."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    shifted = boxes + (labels.to(boxes.dtype) * (boxes.max() + 1))[:, None]
    classes = labels.unique()
    if boxes.shape[0] <= PER_CLASS_FROM or len(classes) == 1:
        return nms(shifted, scores, iou_thr)
    members = [(labels == c).nonzero()[:, 0] for c in classes]
    kept = torch.cat([idx[nms(shifted[idx], scores[idx], iou_thr)] for idx in members]).sort().values
    return kept[scores[kept].argsort(descending=True, stable=True)]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thr: float, block: int = 1024) -> torch.Tensor:
    """Greedy NMS: a box is dropped when its IoU with a kept, higher-scoring box exceeds iou_thr."""
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order].float()
    n = b.shape[0]
    areas = box_area(b)
    overlaps = np.zeros((n, n), dtype=bool)
    for start in range(0, n, block):  # the boolean matrix is built in blocks to bound memory
        rows = b[start:start + block]
        lt = torch.max(rows[:, None, :2], b[None, :, :2])
        rb = torch.min(rows[:, None, 2:], b[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        iou = inter / (areas[start:start + block, None] + areas[None, :] - inter)
        overlaps[start:start + block] = (iou > iou_thr).cpu().numpy()
    alive = np.ones(n, dtype=bool)
    for i in range(n):
        if alive[i]:
            alive[i + 1:] &= ~overlaps[i, i + 1:]
    return order[torch.from_numpy(np.flatnonzero(alive)).to(order.device)]
