"""Where a student's soft targets come from: a teacher cache (the product) or a live teacher run on
the student's batch (the way mmdetection does it; for comparison and for users without a cache).

Both give rows aligned with the student's rows (detector.rows order). A cached
view's rows are the teacher's output on that view alone; a live teacher sees the whole batch
canvas, so the two agree exactly only for batches of equal canvas (GroupNorm)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cache_teacher.codec import decode_rows
from cache_teacher.reader import TeacherCache
from cache_teacher.schema import BOX, BOX_LO, BOX_SCALE, CLS, LOCATION, transform_spec
from detector.coco import Batch, CocoDetection, Sample, collate
from detector.config import ModelConfig
from detector.errors import UserError
from detector.rows import flatten_rows
from detector.runtime import autocast_for
from distill.config import LossConfig


@dataclass
class TargetSample:
    sample: Sample
    stored: dict[str, torch.Tensor]  # encoded rows as stored (fp16 / uint8 + affine), decoded on the device


class CachedTargets(torch.utils.data.Dataset):
    """A dataset that returns each view together with its cached teacher rows (read in the loader
    worker with one contiguous slice per array, shipped encoded to keep inter-process copies small)."""

    def __init__(self, base: CocoDetection, cache: TeacherCache, kinds: tuple[str, ...]):
        self.base, self.cache, self.kinds = base, cache, kinds
        self.spec_of_view = [cache.specs.index(spec) for spec in base.views]  # validated beforehand

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> TargetSample:
        index, view_index = key
        sample = self.base[key]
        v = self.cache.view_index(index, self.spec_of_view[view_index])
        cached = self.cache.records[v]
        if cached != sample.record:
            raise UserError(f"image {sample.record.image_id}: the student's view {sample.record} differs from the "
                            f"cached one {cached}; the feature maps would not line up (dump the cache again)")
        stored = {name: torch.from_numpy(array) for name, array in self.cache.read_rows(v, self.kinds).items()}
        return TargetSample(sample, stored)


def collate_with_targets(items: list[TargetSample]) -> tuple[Batch, dict[str, torch.Tensor]]:
    batch = collate([item.sample for item in items])
    if LOCATION in items[0].stored:  # sparse: locations become row indices of the whole batch
        offsets = [0]
        for item in items[:-1]:
            offsets.append(offsets[-1] + item.sample.record.num_rows)
        for item, offset in zip(items, offsets):
            item.stored[LOCATION] = item.stored[LOCATION].long() + offset
    stored = {name: torch.cat([item.stored[name] for item in items]) for name in items[0].stored}
    return batch, stored


class CacheTeacher:
    """Soft targets read from a teacher cache."""

    def __init__(self, cache: TeacherCache, need_cls: bool):
        self.cache = cache
        self.kinds = ("box", "cls") if need_cls else ("box",)  # a run without KD reads only box bytes

    def describe(self) -> dict:
        return {"kind": "cache", "location": self.cache.location,
                "teacher_sha256": self.cache.meta["teacher"]["checkpoint_sha256"],
                "teacher_config": self.cache.meta["teacher"]["model_config"]}

    def validate(self, dataset: CocoDetection, student: ModelConfig, loss: LossConfig) -> None:
        """Refuse a cache that does not fit the run, before the first step."""
        self.cache.require_complete()
        self.cache.validate(num_classes=student.num_classes, strides=student.strides, reg_max=student.reg_max,
                            transform=transform_spec(), ann_sha256=dataset.ann_sha256, image_ids=dataset.image_ids,
                            specs=dataset.views)
        if loss.kd_weight > 0 and not self.cache.has_cls:
            raise UserError(f"cache {self.cache.location} holds no class logits (dumped with --no-cls) but Main KD "
                            "needs them; pass --kd-weight 0 or dump the teacher with class logits")
        regions = self.cache.meta.get("regions", {"kind": "dense"})
        if regions["kind"] != "dense" and loss.vlr_weight > 0:
            if loss.vlr_gamma < regions["min_vlr_gamma"]:
                raise UserError(f"cache {self.cache.location} stores the VLR for gamma >= {regions['min_vlr_gamma']} "
                                f"only; --vlr-gamma {loss.vlr_gamma} needs more rows (dump with a smaller "
                                "--min-vlr-gamma, or a dense cache)")
            if loss.vlr_iou != regions["vlr_iou"]:
                raise UserError(f"cache {self.cache.location} selected its VLR with --vlr-iou {regions['vlr_iou']}; "
                                f"pass --vlr-iou {regions['vlr_iou']} or dump a cache for {loss.vlr_iou}")

    def dataset(self, base: CocoDetection) -> CachedTargets:
        return CachedTargets(base, self.cache, self.kinds)

    collate = staticmethod(collate_with_targets)

    def rows(self, batch: Batch, stored: dict, device: torch.device):
        box = decode_rows(stored[BOX], stored.get(BOX_LO), stored.get(BOX_SCALE), device)
        cls = decode_rows(stored[CLS], device=device) if CLS in stored else None
        if LOCATION in stored:  # sparse: NaN marks rows the cache does not hold (the criterion checks)
            n = sum(r.num_rows for r in batch.records)
            loc = stored[LOCATION].to(device, non_blocking=True)
            box = box.new_full((n, box.shape[1]), float("nan")).index_copy(0, loc, box)
            if cls is not None:
                cls = cls.new_full((n, cls.shape[1]), float("nan")).index_copy(0, loc, cls)
        return box, cls


class OnlineTeacher:
    """The teacher run on the student's batch at every step (eval mode, no gradient)."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, checkpoint_sha256: str, amp: str = "auto"):
        self.model, self.config, self.sha256, self.amp = model.eval(), config, checkpoint_sha256, amp

    def describe(self) -> dict:
        return {"kind": "online", "teacher_sha256": self.sha256, "teacher_config": self.config.to_dict()}

    def validate(self, dataset: CocoDetection, student: ModelConfig, loss: LossConfig) -> None:
        mismatches = [f"{k}: teacher {getattr(self.config, k)}, student {getattr(student, k)}"
                      for k in ("num_classes", "strides", "reg_max") if getattr(self.config, k) != getattr(student, k)]
        if mismatches:
            raise UserError("teacher and student must share classes, strides and reg_max (LD pairs rows anchor by "
                            "anchor): " + "; ".join(mismatches))

    def dataset(self, base: CocoDetection) -> CocoDetection:
        return base

    collate = staticmethod(collate)

    @torch.no_grad()
    def rows(self, batch: Batch, stored, device: torch.device):
        with autocast_for(device, self.amp):
            cls_maps, box_maps = self.model(batch.images.to(device, non_blocking=True))
        level_hw = [r.level_hw for r in batch.records]
        return flatten_rows(box_maps, level_hw).float(), flatten_rows(cls_maps, level_hw).float()

