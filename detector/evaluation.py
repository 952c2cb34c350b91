"""COCO bbox evaluation (pycocotools) and the COCO results json.

Numbers match mmdetection's CocoMetric: the same pycocotools evaluation with maxDets
(100, 300, 1000), so AP is summarised over up to 100 detections per image and AP50..APl over up
to 1000 (identical when, as usual, post-processing keeps at most 100 per image).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from core.errors import UserError
from core.paths import write_atomically
from data.coco_json import labels_to_cat_ids, load_coco

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # pycocotools stats[0:6], in this order
MAX_DETS = [100, 300, 1000]  # mmdet's proposal_nums


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values.float() if values.is_floating_point() else values).numpy()
    return np.asarray(values)


def detections_to_coco(
    image_id: int,
    boxes_xyxy,  # [N, 4] in original image pixels (tensor or array)
    scores,  # [N]
    labels,  # [N] contiguous labels
    label_to_cat_id: Sequence[int],
) -> list[dict]:
    """One image's detections -> COCO result dicts (xywh boxes, COCO category ids).

    Boxes are rounded to 1/1000 px and scores to 1e-6: far below anything that moves AP, and the
    json stays small (full float repr writes 17 digits per number).
    """
    boxes = _as_numpy(boxes_xyxy).astype(np.float64).reshape(-1, 4)
    scores = _as_numpy(scores).astype(np.float64).reshape(-1)
    labels = _as_numpy(labels).reshape(-1)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(
            f"detections of image {image_id}: {len(boxes)} boxes, {len(scores)} scores, "
            f"{len(labels)} labels"
        )
    xywh = np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]]).round(3).tolist()
    cat_ids = labels_to_cat_ids(labels, label_to_cat_id)
    return [
        {"image_id": int(image_id), "category_id": cat_id, "bbox": box, "score": score}
        for box, score, cat_id in zip(xywh, scores.round(6).tolist(), cat_ids)
    ]


def coco_evaluate(
    ann_file_or_coco: str | Path | COCO,
    results: list[dict],
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """Ground truth + result dicts -> {AP, AP50, AP75, APs, APm, APl} as pycocotools' 0-1 floats.

    image_ids restricts the evaluation to those images (default: every image of the ground truth).
    No detections at all gives zeros. As in pycocotools, an area range without any ground truth
    gives -1.
    """
    if isinstance(ann_file_or_coco, COCO):
        coco_gt = ann_file_or_coco
    else:
        coco_gt = load_coco(ann_file_or_coco)
    for ann in coco_gt.anns.values():
        # COCOeval reads both; converters often omit them (the dataset defaults them the same way).
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    gt_ids = set(coco_gt.getImgIds())
    eval_ids = sorted(gt_ids) if image_ids is None else sorted({int(i) for i in image_ids})
    stray = ({int(r["image_id"]) for r in results} | set(eval_ids)) - gt_ids
    if stray:
        raise UserError(
            f"image ids {sorted(stray)[:5]} are not in the ground truth annotations; "
            "evaluate against the file the detections were made for"
        )
    wanted = set(eval_ids)
    # pycocotools' loadRes mutates the dicts it is given (adds area, id, segmentation): copy them.
    results = [dict(r) for r in results if r["image_id"] in wanted]
    if not results:  # loadRes cannot take an empty list; no detections is AP 0 by definition
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = eval_ids
        evaluator.params.catIds = sorted(coco_gt.getCatIds())
        evaluator.params.maxDets = list(MAX_DETS)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(evaluator.stats[k]) for k, name in enumerate(METRIC_NAMES)}


def format_metrics_table(metrics: dict[str, float]) -> str:
    """Metrics (0-1) -> a two-line table in percent, one decimal, as papers and mmdet print them."""
    cells = [f"{100 * metrics[n]:.1f}" if metrics[n] >= 0 else "-" for n in METRIC_NAMES]
    width = max(6, *(len(c) + 1 for c in cells))
    header = "".join(n.rjust(width) for n in METRIC_NAMES)
    return header + "\n" + "".join(c.rjust(width) for c in cells)


def save_results(path: str | Path, results: list[dict]) -> None:
    """Write result dicts as a COCO results json, atomically (temporary file + rename)."""
    write_atomically(path, json.dumps(results))
