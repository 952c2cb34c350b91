"""The detector as one exportable module (`ldcache export`): the network, GFL decoding and
class-aware NMS in one graph with fixed-size outputs, so that a runtime without this project
(onnxruntime, libtorch) gives the detections `ldcache evaluate` gives.

Inputs: images [N, 3, H, W], normalised and zero-padded bottom/right to multiples of 32 (the
transform of data/views.py), and image_hw [N, 2] int64, each image's (height, width) before the
padding. Boxes are clipped to it, as postprocess clips them to the resized image: a box reaching
into the padding would otherwise overlap others differently in NMS. Outputs: boxes [N, K, 4] xyxy
in input pixels, scores [N, K], labels [N, K] int64, best first; unused slots hold score 0,
label -1 and box 0 (K = max_dets); with raw, the per-level class and box logit maps as well.

The selection is detector/postprocess.py's (mmdetection's GFL test recipe) with fixed shapes: per
level the best nms_pre (location, class) pairs above score_thr (the flat scores are padded by
nms_pre, so topk's k is a constant; a pair below the threshold, or padding, scores -1 and is never
kept), decoded and clipped, class-aware greedy NMS at iou_thr, the best K. Under torch.jit.script
the NMS is greedy_nms_keep; everywhere else (eager, torch.export for ONNX) it is the custom op
ldcache::nms, whose contract is ONNX NonMaxSuppression's, so the ONNX exporter emits that
operator for it (workflows/export.py) and onnxruntime runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detector.postprocess import batched_nms


def not_kept(like: torch.Tensor) -> torch.Tensor:
    """The score of a pair that cannot be kept (below the threshold, padding, suppressed): -1."""
    return torch.full_like(like, -1.0)


@torch.library.custom_op("ldcache::nms", mutates_args=())
def nms_selected(boxes: torch.Tensor, scores: torch.Tensor, iou_thr: float, score_thr: float,
                 max_per_class: int) -> torch.Tensor:
    """ONNX NonMaxSuppression's contract: boxes [N, S, 4] xyxy, scores [N, C, S] -> selected
    [M, 3] int64 rows (image, class, box): per image and class, greedy NMS (IoU > iou_thr
    suppresses) over the boxes scoring above score_thr, at most max_per_class kept per class.
    The eager kernel is the project's NMS (detector/postprocess.py)."""
    rows = [boxes.new_zeros((0, 3), dtype=torch.long)]
    for n in range(boxes.shape[0]):
        cls_idx, box_idx = (scores[n] > score_thr).nonzero(as_tuple=True)
        keep = batched_nms(boxes[n, box_idx], scores[n, cls_idx, box_idx], cls_idx, iou_thr)  # score order
        cls_idx, box_idx = cls_idx[keep], box_idx[keep]
        rank = F.one_hot(cls_idx, scores.shape[1]).cumsum(0).gather(1, cls_idx[:, None])[:, 0]  # 1 = class's best
        cls_idx, box_idx = cls_idx[rank <= max_per_class], box_idx[rank <= max_per_class]
        rows.append(torch.stack([torch.full_like(cls_idx, n), cls_idx, box_idx], dim=1))
    return torch.cat(rows)


@nms_selected.register_fake
def nms_selected_shape(boxes, scores, iou_thr, score_thr, max_per_class):
    count = torch.library.get_ctx().new_dynamic_size()  # how many survive depends on the data
    return boxes.new_empty((count, 3), dtype=torch.long)


def greedy_nms_keep(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_thr: float,
                    max_keep: int) -> torch.Tensor:
    """One image's candidates (boxes [S, 4], scores [S], labels [S]) -> keep [S] bool: class-aware
    greedy NMS as detector/postprocess.py's nms, scriptable. A score <= 0 is never kept. Greedy NMS
    decides boxes in score order, so it stops once max_keep are kept: those are final."""
    order = torch.sort(scores, descending=True, stable=True)[1]
    order = order[: int((scores > 0).sum())]
    b, lab = boxes[order], labels[order]
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    suppressed = torch.zeros(order.shape[0], dtype=torch.bool, device=boxes.device)
    keep = torch.zeros(scores.shape[0], dtype=torch.bool, device=boxes.device)
    kept = 0
    for i in range(order.shape[0]):
        if kept >= max_keep:
            break
        if bool(suppressed[i]):
            continue
        keep[order[i]] = True
        kept += 1
        lt = torch.maximum(b[i, :2], b[i + 1:, :2])
        rb = torch.minimum(b[i, 2:], b[i + 1:, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / (areas[i] + areas[i + 1:] - inter)
        # not `|=`: TorchScript compiles an augmented assignment to a slice into a copy that is dropped
        suppressed[i + 1:] = suppressed[i + 1:] | ((iou > iou_thr) & (lab[i + 1:] == lab[i]))
    return keep


class DeployedDetector(nn.Module):
    """net (a GFL, or its trace) + decoding + NMS: (images, image_hw) -> (boxes, scores, labels,
    class maps, box maps); the two lists of maps are empty unless raw."""

    def __init__(self, net: nn.Module, strides: tuple[int, ...], reg_max: int, num_classes: int, max_dets: int = 100,
                 score_thr: float = 0.05, iou_thr: float = 0.6, nms_pre: int = 1000, raw: bool = False):
        super().__init__()
        if len(strides) * nms_pre < max_dets:
            raise ValueError(f"max_dets {max_dets} exceeds the {len(strides) * nms_pre} candidates")
        self.net = net
        self.strides = list(strides)
        self.reg_max, self.num_classes, self.max_dets = int(reg_max), int(num_classes), int(max_dets)
        self.score_thr, self.iou_thr, self.nms_pre, self.raw = float(score_thr), float(iou_thr), int(nms_pre), raw

    def level_candidates(self, cls_map: torch.Tensor, box_map: torch.Tensor, stride: int, image_hw: torch.Tensor):
        """One level's maps [N, C, h, w], [N, 4(n+1), h, w] -> its nms_pre best pairs: boxes
        [N, P, 4] (clipped to image_hw), scores [N, P] (-1 below the threshold), labels [N, P]."""
        n, c, h, w = cls_map.shape[0], cls_map.shape[1], cls_map.shape[2], cls_map.shape[3]
        bins = self.reg_max + 1
        scores = cls_map.permute(0, 2, 3, 1).reshape(n, h * w * c).float().sigmoid()  # [N, HW*C] location-major
        scores = torch.where(scores > self.score_thr, scores, not_kept(scores))
        scores, pair = F.pad(scores, [0, self.nms_pre], value=-1.0).topk(self.nms_pre, dim=1)  # [N, P]
        loc = torch.div(pair, c, rounding_mode="floor").clamp(max=h * w - 1)  # padding pairs point anywhere
        labels = torch.remainder(pair, c)
        box_rows = box_map.permute(0, 2, 3, 1).reshape(n, h * w, 4 * bins).float()
        logits = box_rows.gather(1, loc[:, :, None].expand(n, self.nms_pre, 4 * bins))  # [N, P, 4(n+1)]
        probs = logits.reshape(n, self.nms_pre, 4, bins).softmax(-1)
        dist = probs @ torch.arange(bins, dtype=probs.dtype, device=probs.device) * stride  # [N, P, 4] integral
        row = torch.div(loc, w, rounding_mode="floor")  # (not remainder: ONNX cannot take a dynamic w there)
        cx, cy = (loc - row * w).float() * stride, row.float() * stride  # the prior's centre
        limit_h, limit_w = image_hw[:, 0:1].float(), image_hw[:, 1:2].float()  # [N, 1]
        x1 = torch.minimum((cx - dist[:, :, 0]).clamp(min=0), limit_w)
        y1 = torch.minimum((cy - dist[:, :, 1]).clamp(min=0), limit_h)
        x2 = torch.minimum((cx + dist[:, :, 2]).clamp(min=0), limit_w)
        y2 = torch.minimum((cy + dist[:, :, 3]).clamp(min=0), limit_h)
        return torch.stack([x1, y1, x2, y2], dim=-1), scores, labels

    def nms_keep(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Candidates [N, S, 4], [N, S], [N, S] -> keep [N, S] bool (at most max_dets per image)."""
        if torch.jit.is_scripting():
            return torch.stack([greedy_nms_keep(boxes[i], scores[i], labels[i], self.iou_thr, self.max_dets)
                                for i in range(boxes.shape[0])])
        else:  # one score per class, as NonMaxSuppression takes them: a box scores only in its own class
            classes = torch.arange(self.num_classes, device=labels.device)
            class_scores = torch.where(labels[:, None, :] == classes[None, :, None], scores[:, None, :],
                                       not_kept(scores)[:, None, :])  # [N, C, S]
            selected = torch.ops.ldcache.nms(boxes, class_scores, self.iou_thr, 0.0, self.max_dets)  # [M, 3]
            keep = torch.zeros_like(scores, dtype=torch.bool)
            return keep.index_put((selected[:, 0], selected[:, 2]), torch.ones_like(selected[:, 0], dtype=torch.bool))

    def forward(self, images: torch.Tensor, image_hw: torch.Tensor):
        cls_maps, box_maps = self.net(images)
        boxes_per_level, scores_per_level, labels_per_level = [], [], []
        for level in range(len(self.strides)):
            boxes, scores, labels = self.level_candidates(cls_maps[level], box_maps[level], self.strides[level],
                                                          image_hw)
            boxes_per_level.append(boxes)
            scores_per_level.append(scores)
            labels_per_level.append(labels)
        boxes, scores = torch.cat(boxes_per_level, dim=1), torch.cat(scores_per_level, dim=1)  # [N, S, 4], [N, S]
        labels = torch.cat(labels_per_level, dim=1)  # [N, S]
        valid = (scores > self.score_thr) & (boxes[:, :, 2] > boxes[:, :, 0]) & (boxes[:, :, 3] > boxes[:, :, 1])
        scores = torch.where(valid, scores, not_kept(scores))
        kept = torch.where(self.nms_keep(boxes, scores, labels), scores, not_kept(scores))
        top, best = kept.topk(self.max_dets, dim=1)  # [N, K], best first
        found = top > 0
        out_boxes = boxes.gather(1, best[:, :, None].expand(best.shape[0], self.max_dets, 4))
        out_boxes = torch.where(found[:, :, None], out_boxes, torch.zeros_like(out_boxes))
        out_scores = torch.where(found, top, torch.zeros_like(top))
        out_labels = torch.where(found, labels.gather(1, best), torch.full_like(best, -1))
        raw_cls: list[torch.Tensor] = []
        raw_box: list[torch.Tensor] = []
        if self.raw:
            raw_cls, raw_box = cls_maps, box_maps
        return out_boxes, out_scores, out_labels, raw_cls, raw_box
