"""A dump's plan, known before any teacher runs: where every view's rows go (the layout), which
rows a region-sparse (main+vlr) or ld+bckd cache stores box logits for (the ATSS positives and the
VLR band of every view, from the annotations alone), and the batches the teacher runs in. The one
home of this arithmetic: the dump and the benchmarks that mimic it both call plan_dump."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache_teacher import schema
from cache_teacher.layout import Layout, plan_layout, with_region_space
from core.runtime import progress_bar
from data.coco import CocoDetection
from detector.config import ModelConfig
from detector.regions import distillation_rows


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
    return [
        rows
        for rows in progress_bar(
            loader, total=len(dataset), desc="plan regions", unit="img", disable=not progress, leave=False
        )
    ]


@dataclass(frozen=True)
class DumpPlan:
    layout: Layout
    regions: schema.Regions
    region_rows: list[list[torch.Tensor]] | None  # [image][spec] -> stored dense row indices (sparse kinds)


def plan_dump(dataset: CocoDetection, teacher_cfg: ModelConfig, *, box_dtype: str = "float16",
              cls_dtype: str | None = "float16", shard_mb: float = 64.0, store_regions: str = "dense",
              min_vlr_gamma: float = 0.25, vlr_iou: str = "official", cls_topk: int = 4, workers: int = 0,
              progress: bool = False) -> DumpPlan:
    """The layout of a cache of this dataset and teacher: shards sized from the bytes of a row
    (box and class logits; a location index in a main+vlr cache; edges and top-k classes in an
    ld+bckd cache's dense rows, whose box rows get a second row space), and its regions."""
    sparse, two = store_regions != "dense", store_regions == "ld+bckd"
    topk = min(cls_topk, teacher_cfg.num_classes)
    if two:  # the dense rows: edges, top-k values and classes, floor
        row_bytes = 8 + topk * (2 + (1 if teacher_cfg.num_classes <= 256 else 2)) + 2
    else:
        row_bytes = 4 * (teacher_cfg.reg_max + 1) * np.dtype(box_dtype).itemsize + (
            teacher_cfg.num_classes * np.dtype(cls_dtype).itemsize if cls_dtype else 0) + (4 if sparse else 0)
    region_rows = plan_region_rows(dataset, min_vlr_gamma, vlr_iou, workers, progress) if sparse else None
    counts = [[len(r) for r in rows] for rows in region_rows] if sparse else None
    records = [[dataset.view_record(i, s) for s in range(len(dataset.views))] for i in range(len(dataset))]
    layout = plan_layout(records, row_bytes=row_bytes, shard_mb=shard_mb, rows_per_view=None if two else counts)
    if two:
        layout = with_region_space(layout, counts)
    regions = schema.Regions()
    if sparse:
        stored = layout.region_rows if two else layout.num_rows
        regions = schema.Regions(store_regions, min_vlr_gamma, vlr_iou, "atss-topk9", int(stored.sum()),
                                 int(sum(r.num_rows for r in layout.records)), cls_topk=topk if two else None)
    return DumpPlan(layout, regions, region_rows)


def shard_batches(layout: Layout, shards, batch_size: int) -> list[list[int]]:
    """The teacher's batches (view indices) over these shards: equal canvases, cut at shard ends."""
    return [b for s in shards for b in layout.batches_of_shard(s, batch_size)]


def view_keys(layout: Layout, batches: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Batches of view indices as the dataset's (image index, view spec index) keys."""
    return [[(int(layout.image_index[v]), int(layout.spec_index[v])) for v in b] for b in batches]
