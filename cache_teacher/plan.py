"""The rows a region-sparse (main+vlr) or ld+bckd cache stores box logits for: the ATSS positives
and the VLR band of every view, from the annotations alone, so they are known before any teacher
runs, like a dense cache's row offsets."""

from __future__ import annotations

import torch

from data.coco import CocoDetection
from detector.regions import distillation_rows
from core.runtime import progress_bar


class RegionRows(torch.utils.data.Dataset):
    """Image i -> for each of its views, the dense row indices a region-sparse cache stores."""

    def __init__(self, dataset: CocoDetection, min_vlr_gamma: float, vlr_iou: str):
        self.dataset, self.min_vlr_gamma, self.vlr_iou = dataset, min_vlr_gamma, vlr_iou

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        out = []
        for s in range(len(self.dataset.views)):
            record = self.dataset.view_record(i, s)
            boxes, _ = self.dataset.view_boxes(i, record)
            rows = distillation_rows(record.level_hw, boxes, self.dataset.strides, self.min_vlr_gamma, self.vlr_iou)
            out.append(rows.to(torch.int32))
        return out


def _as_is(item):
    return item


def plan_region_rows(dataset: CocoDetection, min_vlr_gamma: float, vlr_iou: str, workers: int = 0,
                     progress: bool = False) -> list[list[torch.Tensor]]:
    """The stored rows of every view of a region-sparse cache, from the annotations alone (ATSS and
    the VLR band per view, in loader workers): known before the teacher runs, like dense offsets."""
    loader = torch.utils.data.DataLoader(RegionRows(dataset, min_vlr_gamma, vlr_iou), batch_size=None,
                                         num_workers=workers, collate_fn=_as_is)
    return [rows for rows in progress_bar(loader, total=len(dataset), desc="plan regions", unit="img", disable=not progress,
                                  leave=False)]
