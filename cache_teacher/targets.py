"""A teacher cache as the soft-target source of a student run (the TeacherSource that
distill.teachers describes): each view is served with its cached rows, decoded on the device.

The rows of a view are read in the DataLoader worker with one contiguous slice per array and
shipped encoded (fp16, or uint8 with its affine), which keeps the inter-process copies small;
`rows` decodes them on the training device. A region-sparse cache holds only the rows the
distillation losses read: the others come back as NaN, which the criterion refuses to read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cache_teacher.decoded import spread
from cache_teacher.reader import CacheReader
from cache_teacher.schema import LOCATION, transform_spec
from core.errors import UserError
from data.coco import Batch, CocoDetection, Sample, collate
from detector.config import ModelConfig
from detector.regions import TeacherNeeds
from detector.rows import TeacherRows


@dataclass
class SampleWithRows:
    sample: Sample
    stored: dict[str, torch.Tensor]  # the view's rows as stored, decoded on the device


class CachedTargetDataset(torch.utils.data.Dataset):
    """A dataset that returns each view together with its cached teacher rows."""

    def __init__(self, base: CocoDetection, cache: CacheReader, kinds: tuple[str, ...]):
        self.base, self.cache, self.kinds = base, cache, kinds
        self.spec_of_view = [cache.specs.index(spec) for spec in base.views]  # validated beforehand
        self.cached_image = [cache.index_of_image[i] for i in base.image_ids]  # a subset's images by id

    def __len__(self) -> int:
        return len(self.base)

    def stored_rows(self, key) -> dict[str, torch.Tensor]:
        """The stored rows of (image index, view index) of the base dataset."""
        index, view_index = key
        v = self.cache.view_index(self.cached_image[index], self.spec_of_view[view_index])
        return {name: torch.from_numpy(array) for name, array in self.cache.read_rows(v, self.kinds).items()}

    def __getitem__(self, key) -> SampleWithRows:
        sample = self.base[key]
        cached = self.cache.records[self.cache.view_index(self.cached_image[key[0]], self.spec_of_view[key[1]])]
        if cached != sample.record:
            raise UserError(f"image {sample.record.image_id}: the student's view {sample.record} differs from the "
                            f"cached one {cached}; the feature maps would not line up (dump the cache again)")
        return SampleWithRows(sample, self.stored_rows(key))


def collate_with_targets(items: list[SampleWithRows]) -> tuple[Batch, dict[str, torch.Tensor]]:
    batch = collate([item.sample for item in items])
    stored = [dict(item.stored) for item in items]
    if LOCATION in stored[0]:  # sparse: locations become row indices of the whole batch
        offset = 0
        for item, rows in zip(items, stored):
            rows[LOCATION] = rows[LOCATION].long() + offset
            offset += item.sample.record.num_rows
    return batch, {name: torch.cat([rows[name] for rows in stored]) for name in stored[0]}


class CachedTeacher:
    """Soft targets read from a teacher cache."""

    def __init__(self, cache: CacheReader):
        self.cache = cache

    def describe(self) -> dict:
        return {"kind": "cache", "location": self.cache.location, "teacher_sha256": self.cache.meta.teacher_sha256,
                "teacher_config": self.cache.meta.teacher_config}

    def to(self, device: torch.device) -> CachedTeacher:
        return self  # rows are read on the host and moved with each batch (rows())

    def validate(self, dataset: CocoDetection, student: ModelConfig, needs: TeacherNeeds) -> None:
        """Refuse a cache that does not fit the run, before the first step."""
        cache, meta = self.cache, self.cache.meta
        cache.require_complete()
        problems = meta.mismatches(num_classes=student.num_classes, strides=student.strides, reg_max=student.reg_max,
                                   transform=transform_spec(), specs=dataset.views)
        dataset_problems = meta.mismatches(ann_sha256=dataset.ann_sha256, image_ids=dataset.image_ids)
        if dataset_problems:  # not the dumped dataset: a subset of its images is fine
            subset = cache.subset_problem(dataset.image_ids, dataset.image_digests())
            if subset is not None:
                problems.append(f"the run's {len(dataset.image_ids)} images are neither the cached dataset "
                                f"({len(cache.image_ids)} images) nor a subset of it: {subset}")
            elif problems:
                problems += dataset_problems
        if problems:
            raise UserError(f"cache {cache.location} does not match this run: " + "; ".join(problems))
        if needs.class_logits and not cache.has_cls:
            users = "BCKD" if needs.every_location else "Main KD"
            fix = "--kd-weight 0" if not needs.every_location else "no BCKD weight"
            raise UserError(f"cache {cache.location} holds no class logits (dumped with --no-cls) but {users} "
                            f"needs them; pass {fix} or dump the teacher with class logits")
        if needs.every_location and not meta.regions.every_location:
            raise UserError(f"cache {cache.location} stores only the Main and VLR rows (--store-regions "
                            f"{meta.regions.kind}) but BCKD reads every location; dump the teacher with "
                            "--store-regions ld+bckd (serves LD and BCKD, compact) or dense")
        if meta.regions.sparse and needs.vlr_gamma is not None:
            if needs.vlr_gamma < meta.regions.min_vlr_gamma:
                raise UserError(f"cache {cache.location} stores the VLR for gamma >= {meta.regions.min_vlr_gamma} "
                                f"only; --vlr-gamma {needs.vlr_gamma} needs more rows (dump with a smaller "
                                "--min-vlr-gamma, or a dense cache)")
            if needs.vlr_iou != meta.regions.vlr_iou:
                raise UserError(f"cache {cache.location} selected its VLR with --vlr-iou {meta.regions.vlr_iou}; "
                                f"pass --vlr-iou {meta.regions.vlr_iou} or dump a cache for {needs.vlr_iou}")

    def dataset(self, base: CocoDetection, needs: TeacherNeeds) -> CachedTargetDataset:
        """Only the arrays the losses read: a run without Main KD or BCKD reads no class logits; from
        an ld+bckd cache, BCKD alone reads no box logits and LD alone no edges."""
        two = self.cache.meta.regions.two_spaces
        kinds = ("box",) if needs.box_logits or not two else ()
        kinds += ("cls",) if needs.class_logits else ()
        kinds += ("edges",) if needs.every_location and two else ()
        return CachedTargetDataset(base, self.cache, kinds)

    collate = staticmethod(collate_with_targets)

    def rows(self, batch: Batch, stored: dict, device: torch.device) -> TeacherRows:
        box, cls, location, edges = self.cache.decode(stored, device)
        two = self.cache.meta.regions.two_spaces  # ld+bckd: class logits and edges at every location
        if not self.cache.sparse:
            return TeacherRows(box, cls)
        # Sparse: NaN marks rows the cache does not hold (the criterion checks the rows it reads).
        n, width = sum(r.num_rows for r in batch.records), 4 * (self.cache.meta.reg_max + 1)
        if box is None:  # not read (BCKD alone from an ld+bckd cache): every row a hole, no memory
            box = torch.full((1, width), float("nan"), device=device).expand(n, width)
        else:
            box = spread(box, location, n)
        if cls is not None and not two:  # main+vlr: class logits at the stored rows only
            cls = spread(cls, location, n)
        return TeacherRows(box, cls, holes=True, edges=edges)
