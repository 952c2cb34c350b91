"""Where a student's soft targets come from: the TeacherSource interface, and the teacher run
live on the student's batch (the way mmdetection does it: for comparison, and for users without a
cache). The product's source, a teacher cache, implements the same interface in
cache_teacher/targets.py; distill never imports it (the two stages are independent layers).

Every source gives teacher rows aligned with the student's rows (detector.rows). A cached view's
rows are the teacher's output on that view alone; a live teacher sees the whole batch canvas, so
the two agree exactly only for batches of equal canvas (GroupNorm)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from core.errors import UserError
from core.runtime import autocast_for
from data.coco import Batch, CocoDetection, collate
from detector.checkpoint import file_sha256, load_model
from detector.config import ModelConfig
from detector.regions import TeacherNeeds
from detector.rows import TeacherRows, flatten_rows


class TeacherSource(Protocol):
    """What the training loop needs of a teacher, cached or live."""

    def describe(self) -> dict:
        """JSON-able identity of the source, saved in the run's config.json."""

    def validate(self, dataset: CocoDetection, student: ModelConfig, needs: TeacherNeeds) -> None:
        """Raise UserError before step 1 if the source cannot serve this run."""

    def to(self, device: torch.device) -> TeacherSource:
        """Put what the source computes with on the student's device (the process's own GPU under
        torchrun, known only once the process group exists); returns the source."""

    def dataset(self, base: CocoDetection, needs: TeacherNeeds) -> torch.utils.data.Dataset:
        """The training dataset, its items carrying whatever `rows` needs besides the batch."""

    def collate(self, items: list) -> Batch | tuple[Batch, Any]:
        """Items of `dataset` -> a Batch, or (Batch, stored rows)."""

    def rows(self, batch: Batch, stored: Any, device: torch.device) -> TeacherRows:
        """Teacher rows of the batch, row-aligned with the student's, on `device`."""


class OnlineTeacher:
    """The teacher run on the student's batch at every step (eval mode, no gradient)."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, checkpoint_sha256: str, amp: str = "auto"):
        self.model, self.config, self.sha256, self.amp = model.eval(), config, checkpoint_sha256, amp

    @classmethod
    def from_checkpoint(cls, path, arch: dict, device: torch.device, amp: str = "auto") -> OnlineTeacher:
        model, config = load_model(path, arch, device, role="teacher checkpoint")
        return cls(model, config, file_sha256(path), amp=amp)

    def describe(self) -> dict:
        return {"kind": "online", "teacher_sha256": self.sha256, "teacher_config": self.config.to_dict()}

    def validate(self, dataset: CocoDetection, student: ModelConfig, needs: TeacherNeeds) -> None:
        mismatches = [f"{k}: teacher {getattr(self.config, k)}, student {getattr(student, k)}"
                      for k in ("num_classes", "strides", "reg_max") if getattr(self.config, k) != getattr(student, k)]
        if mismatches:
            raise UserError("teacher and student must share classes, strides and reg_max (LD pairs rows anchor by "
                            "anchor): " + "; ".join(mismatches))

    def to(self, device: torch.device) -> OnlineTeacher:
        self.model.to(device)
        return self

    def dataset(self, base: CocoDetection, needs: TeacherNeeds) -> CocoDetection:
        return base

    collate = staticmethod(collate)

    @torch.no_grad()
    def rows(self, batch: Batch, stored, device: torch.device) -> TeacherRows:
        with autocast_for(device, self.amp):
            cls_maps, box_maps = self.model(batch.images.to(device, non_blocking=True))
        level_hw = [r.level_hw for r in batch.records]
        return TeacherRows(flatten_rows(box_maps, level_hw).float(), flatten_rows(cls_maps, level_hw).float())
