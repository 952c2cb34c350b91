"""train-detector and train-student from the options a user gave (a TOML table and flags per
config): every config is built, and so validated, before any data is read, generated or written;
then one training run. A bad value never costs the synthetic dataset's generation or a run folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from core.config import build_config
from data.builders import build_train_dataset
from data.config import DataConfig
from detector.config import GFL_STRIDES, ModelConfig
from distill.config import LossConfig, TrainConfig
from distill.engine import run_train
from distill.teachers import TeacherSource
from workflows.student import data_hints


def run_training(fields: dict, out: Path, resume: bool, teacher: TeacherSource | None = None, what: str = "GFL",
                 echo=print) -> dict:
    """fields: {"data", "model", "train", "loss": option values}. Returns run_train's result."""
    train_cfg = build_config(TrainConfig, fields["train"], "train")
    loss_cfg = build_config(LossConfig, fields["loss"], "loss")
    model_cfg = build_config(ModelConfig, fields["model"], "model")  # num_classes: the dataset's unless given
    given = build_config(DataConfig, fields["data"], "data")
    data = given.resolve("train", val=True, **data_hints(teacher))  # the one resolution of this run's data
    dataset = build_train_dataset(data, GFL_STRIDES)
    if "num_classes" not in fields["model"]:
        model_cfg = replace(model_cfg, num_classes=dataset.num_classes)
    echo(f"training {what} {model_cfg.backbone_name} ({model_cfg.num_classes} classes) on {data.ann} "
         f"({len(dataset)} images) -> {out}")
    return run_train(data, model_cfg, train_cfg, loss_cfg, out, resume=resume, dataset=dataset, teacher=teacher)
