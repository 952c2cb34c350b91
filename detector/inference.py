"""Run a detector over a dataset and score it with COCO metrics.

Images are batched only with others of the same padded canvas, because GroupNorm in the head
normalises over the whole canvas: a batch of equal canvases gives every image exactly the result
it would get alone (mmdetection tests one image at a time)."""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm import tqdm

from detector.coco import CocoDetection, collate
from detector.evaluation import coco_evaluate, detections_to_coco
from detector.postprocess import PostprocessConfig, postprocess
from detector.runtime import autocast_for
from detector.views import ViewRecord


def canvas_batches(records: list[ViewRecord], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches whose members share one padded size (order kept in a group)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[record.padded_hw].append(i)
    return [idx[s:s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 1,
                    workers: int = 0, amp: str = "auto", cfg: PostprocessConfig = PostprocessConfig(),
                    progress: bool = True) -> list[dict]:
    """Detections of view 0 of every image as COCO result dicts (original image pixels)."""
    model.eval()
    records = [dataset.view_record(i, 0) for i in range(len(dataset))]
    batches = [[(i, 0) for i in b] for b in canvas_batches(records, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    config = model.config
    results = []
    with tqdm(total=len(dataset), desc="evaluate", unit="img", disable=not progress, leave=False) as bar:
        for batch in loader:
            with autocast_for(device, amp):
                cls_out, box_out = model(batch.images.to(device, non_blocking=True))
            dets = postprocess(cls_out, box_out, batch.records, config.strides, config.reg_max, cfg)
            for record, det in zip(batch.records, dets):
                results += detections_to_coco(record.image_id, det.boxes.cpu(), det.scores.cpu(), det.labels.cpu(),
                                              dataset.label_to_cat_id)
            bar.update(len(batch.records))
    return results


def evaluate_model(model, dataset: CocoDetection, device, batch_size: int = 1, workers: int = 0, amp: str = "auto",
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """-> (COCO metrics {"AP", "AP50", ...}, the detections as COCO results)."""
    results = predict_dataset(model, dataset, device, batch_size, workers, amp, progress=progress)
    metrics = coco_evaluate(dataset.ann_file, results, image_ids=dataset.image_ids)
    return metrics, results
