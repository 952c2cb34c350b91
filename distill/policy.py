"""The losses a run trains with, resolved once before set-up from what was asked and what the data
and the teacher are: resolve_loss_policy. Its result is what config.json records and what the
criterion is built from; its notes and warnings are printed once."""

from __future__ import annotations

from dataclasses import dataclass, field

from data.coco import CocoDetection
from detector.config import ModelConfig
from distill.config import PAPER_LD_TEMPERATURE, LossConfig
from distill.geometry import median_edge_bins, temperature_note


@dataclass(frozen=True)
class LossPolicy:
    loss: LossConfig  # every value set (a recipe's, the data's LD temperature, no Main KD on one class)
    distills: bool  # a teacher is read (False: plain training even with a teacher given)
    notes: list[str] = field(default_factory=list)  # printed as "note: ..."
    warnings: list[str] = field(default_factory=list)  # printed as "warning: ..."; recorded in config.json
    recorded: dict = field(default_factory=dict)  # what config.json adds (the median edge, the warnings)


def resolve_loss_policy(loss: LossConfig, model_cfg: ModelConfig, dataset: CocoDetection, images_per_process: int,
                        teacher: bool) -> LossPolicy:
    """The one place where a run's loss policy is decided, from the losses asked for, the model, the
    training data, the images per process and whether a teacher is given."""
    notes, recorded = [], {}
    resolved = loss.for_classes(model_cfg.num_classes)
    if teacher and resolved is not loss:
        notes.append("one-class data: no Main KD (--kd-mode auto); --kd-mode sigmoid distils the one class score")
    loss = resolved
    distills = teacher and loss.distills  # every distillation weight 0 (--recipe none): plain training
    if distills and loss.ld_temperature is None and (loss.ld_weight or loss.vlr_weight):
        recorded["median_edge_bins"] = edges = median_edge_bins(dataset, model_cfg.strides, model_cfg.reg_max)
        loss = loss.for_edges(edges)
        if loss.ld_temperature != PAPER_LD_TEMPERATURE:
            notes.append(temperature_note(loss.ld_temperature, edges))
    warnings = loss.strength_warnings(images_per_process, model_cfg.num_classes) if distills else []
    if warnings:
        recorded["warnings"] = warnings
    return LossPolicy(loss, distills, notes, warnings, recorded)
