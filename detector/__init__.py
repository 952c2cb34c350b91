"""The GFL detector shared by teacher and student: model, priors, ATSS, GFL losses, decoding,
COCO data and views, evaluation and checkpoints (mmdetection compatible)."""

from core.errors import UserError
from detector.checkpoint import load_checkpoint, save_checkpoint
from detector.config import ModelConfig
from detector.model import GFL, build_detector

__all__ = ["GFL", "ModelConfig", "UserError", "build_detector", "load_checkpoint", "save_checkpoint"]
