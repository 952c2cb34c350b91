"""A run folder and its resume rules.

A run lives in one folder: config.json (the resolved configuration), metrics.jsonl (one JSON
object per logged step and per evaluation), checkpoints/last.pt (model, optimizer and position,
written atomically), eval.json and val_results.json after training. A folder that holds a run is
never overwritten; --resume continues it when its configuration is the same up to the settings
that change how, not what, is trained."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from core.config import config_to_dict
from core.errors import UserError
from core.paths import write_atomically
from data.config import DataConfig
from detector.checkpoint import read_checkpoint
from detector.config import ModelConfig
from distill.config import LossConfig, TrainConfig

# Settings that may differ when a run is resumed: they change how, not what, is trained.
# category_ids: derived from the annotation file, whose sha256 is compared (recorded since 0.3)
# images, ann, val_images, val_ann: where the data lies (a dataset that moved); what it is, the training
# annotations' sha256, image count and classes ("dataset"), is compared
RESUMABLE_CHANGES = {"max_iters", "workers", "device", "amp", "log_every", "checkpoint_every", "eval_batch_size",
                     "eval_every", "tensorboard", "category_ids", "images", "ann", "val_images", "val_ann"}


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def results(self) -> Path:
        return self.root / "val_results.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


def resolved_config(data, model_cfg, train, loss, dataset, extra) -> dict:
    """What config.json holds: every setting, the dataset's identity, and the teacher source."""
    return {
        "data": config_to_dict(data),
        "model": model_cfg.to_dict(),
        "train": config_to_dict(train),
        "loss": config_to_dict(loss),
        "dataset": {"num_images": len(dataset), "ann_sha256": dataset.ann_sha256, "class_names": dataset.class_names,
                    "category_ids": [int(c) for c in dataset.cat_ids]},
        **(extra or {}),
    }


def default_config() -> dict:
    """Every setting's default, nested as in config.json: what a key a saved config.json lacks
    compares as on --resume (the run predates that field, so it ran with its default)."""
    return {"data": config_to_dict(DataConfig()), "model": ModelConfig().to_dict(),
            "train": config_to_dict(TrainConfig()), "loss": config_to_dict(LossConfig())}


def config_differences(old: dict, new: dict, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, except the RESUMABLE_CHANGES. A key the saved config (`old`)
    lacks compares as its value in `defaults` (same nesting): a run folder written before a field
    existed ran with what is now that field's default."""
    defaults = defaults or {}
    diffs = []
    for key in sorted(set(old) | set(new)):
        default = defaults.get(key)
        a, b = old.get(key, default), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, default if isinstance(default, dict) else {}, f"{prefix}{key}.")
        elif a != b and key not in RESUMABLE_CHANGES:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def prepare_run_dir(paths: RunPaths, config: dict, resume: bool, defaults: dict | None = None) -> bool:
    """Refuse to overwrite a run; on resume check the configuration (a key the saved one lacks
    compares as its value in `defaults`). Writes config.json and returns whether there is a
    checkpoint to resume from."""
    if paths.last.exists() and not resume:
        raise UserError(
            f"{paths.root} already holds a training run; pass --resume to continue it or choose another --out"
        )
    resuming = resume and paths.last.exists()
    if resuming:
        old = json.loads(paths.config.read_text()) if paths.config.exists() else {}
        diffs = config_differences(old, config, defaults)
        if diffs:
            raise UserError(f"cannot resume {paths.root}: its configuration differs ({'; '.join(diffs[:4])}); "
                            "use the original options or another --out")
        read_checkpoint(paths.last)  # a damaged checkpoint is refused here, before any rank starts
    paths.root.mkdir(parents=True, exist_ok=True)
    write_atomically(paths.config, json.dumps(config, indent=2) + "\n")
    return resuming


def truncate_metrics(path: Path, last_iter: int, redo_evaluation: bool = False) -> None:
    """Drop records beyond the resumed position so a resumed run does not log steps twice, and with
    redo_evaluation the evaluation at last_iter (a finished run evaluates again). A record cut short
    by a kill mid-write is dropped too. Rewritten atomically: a kill here loses nothing."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("iter"), int) or record["iter"] > last_iter:
            continue
        if redo_evaluation and record["iter"] == last_iter and "AP" in record:
            continue
        kept.append(line)
    write_atomically(path, "".join(line + "\n" for line in kept))


def evaluated_at(path: Path, iteration: int) -> bool:
    """Does metrics.jsonl hold an evaluation at this step?"""
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("iter") == iteration and "AP" in record:
            return True
    return False


class MetricsLog:
    """metrics.jsonl (the source of truth), appended by the main process only, and the same
    scalars as TensorBoard events in tensorboard_dir when given (the step is the record's iter).
    purge_step: a resumed run drops the events it logs again from that step on."""

    def __init__(self, path: Path, main: bool, tensorboard_dir: Path | None = None, purge_step: int | None = None):
        self.file = path.open("a") if main else open(os.devnull, "w")
        self.writer = None
        if main and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (tensorboard_available)

            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=purge_step)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("iter", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["iter"])
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
