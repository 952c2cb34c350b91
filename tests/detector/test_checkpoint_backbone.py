import pytest
import torch

from core.errors import UserError
from detector import ModelConfig, build_detector, save_checkpoint
from detector.checkpoint import load_backbone_weights
from tests.conftest import TINY_MODEL


def test_backbone_weights_from_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    source = build_detector(ModelConfig(num_classes=3, **TINY_MODEL))
    # torchvision's file: backbone names at the top level plus a classifier we must ignore.
    tv = {**source.backbone.state_dict(), "fc.weight": torch.zeros(1000, 64), "fc.bias": torch.zeros(1000)}
    torch.save(tv, tmp_path / "resnet18.pth")
    torch.manual_seed(1)
    target = build_detector(ModelConfig(num_classes=3, **TINY_MODEL))
    load_backbone_weights(target, tmp_path / "resnet18.pth")
    assert all(
        torch.equal(a, b) for a, b in zip(source.backbone.state_dict().values(), target.backbone.state_dict().values())
    )
    assert not torch.equal(source.bbox_head.gfl_cls.weight, target.bbox_head.gfl_cls.weight)  # only the backbone


def test_backbone_weights_from_a_detector_checkpoint_and_a_wrong_depth(tmp_path):
    cfg = ModelConfig(num_classes=3, **TINY_MODEL)
    save_checkpoint(tmp_path / "det.pt", build_detector(cfg), cfg)
    load_backbone_weights(build_detector(cfg), tmp_path / "det.pt")  # backbone.* entries are used
    with pytest.raises(UserError, match="backbone weights .* does not fit"):
        load_backbone_weights(
            build_detector(ModelConfig(num_classes=3, **{**TINY_MODEL, "depth": 34})), tmp_path / "det.pt"
        )
