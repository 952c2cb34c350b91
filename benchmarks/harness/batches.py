"""Synthetic batches and fixed teacher rows for the step benchmarks (vs_mmdetection, step_phases):
no dataset, no reads, the same batch every step."""

from __future__ import annotations

import torch

from cache_teacher.codec import decode_rows
from data.coco import Batch
from data.views import ViewRecord, level_sizes
from detector.rows import TeacherRows


class CachedRows:
    """A teacher source serving fixed fp16 rows, decoded on the device each step (the cache's path
    without its reads)."""

    def __init__(self, stored: dict):
        self.stored = stored

    def rows(self, batch, stored, device) -> TeacherRows:
        return TeacherRows(
            decode_rows(self.stored["box"], device=device), decode_rows(self.stored["cls"], device=device)
        )


def random_batch(b: int, h: int, w: int, strides) -> tuple[Batch, dict]:
    """B normalised noise images with 7 random GT boxes each (80 classes), as mmdet_side reads them."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, h, w, generator=g)
    boxes, labels = [], []
    for _ in range(b):
        xy = torch.rand(7, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(7, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, 80, (7,), generator=g))
    records = [ViewRecord(i, False, (max(h, w), min(h, w)), (h, w), (h, w), (h, w), level_sizes((h, w), strides))
               for i in range(b)]
    return Batch(images, boxes, labels, records, list(range(b))), {"images": images, "boxes": boxes, "labels": labels}
