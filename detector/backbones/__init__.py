"""Backbones of the GFL detector: ResNet (detector/resnet.py) and light-weight ImageNet ones, each
with its library's state-dict names so that library's ImageNet file loads unchanged.

forward(images [B, 3, H, W]) returns feature maps whose last three are C3, C4, C5 (strides 8, 16,
32; ResNet returns C2 first); out_channels lists the channels of each map returned. The stem and
the first frozen_stages stages get no gradient, and norm_eval keeps every BatchNorm in eval mode.
"""

from __future__ import annotations

from torch import nn

from detector.backbones import efficientnet_lite, mobilenet_v2, shufflenet_v2
from detector.backbones.efficientnet_lite import EfficientNetLite0
from detector.backbones.mobilenet_v2 import MobileNetV2
from detector.backbones.shufflenet_v2 import ShuffleNetV2
from detector.config import BACKBONE_STAGES, ModelConfig
from detector.resnet import ResNet

# The classifier entries of each library's ImageNet file: not part of our backbone, dropped on loading.
HEAD_PREFIXES = {"resnet": ("fc.",), "mobilenet_v2": mobilenet_v2.HEAD_PREFIXES,
                 "efficientnet_lite0": efficientnet_lite.HEAD_PREFIXES,
                 **{name: shufflenet_v2.HEAD_PREFIXES for name in shufflenet_v2.WIDTHS}}
TV_SHUFFLENET_FILES = {"shufflenet_v2_x0_5": "shufflenetv2_x0.5-f707e7126e.pth",
                       "shufflenet_v2_x1_0": "shufflenetv2_x1-5666bf0f80.pth",
                       "shufflenet_v2_x1_5": "shufflenetv2_x1_5-3c479a10.pth",
                       "shufflenet_v2_x2_0": "shufflenetv2_x2_0-8be3c8ee.pth"}


def build_backbone(config: ModelConfig) -> nn.Module:
    name = config.backbone
    if name == "resnet":
        return ResNet(config.depth, config.base_width, config.frozen_stages, config.norm_eval)
    if name == "mobilenet_v2":
        return MobileNetV2(config.frozen_stages, config.norm_eval)
    if name in shufflenet_v2.WIDTHS:
        return ShuffleNetV2(name, config.frozen_stages, config.norm_eval)
    if name == "efficientnet_lite0":
        return EfficientNetLite0(config.frozen_stages, config.norm_eval)
    raise ValueError(f"no backbone {name!r}; expected one of {list(BACKBONE_STAGES)}")  # ModelConfig checks first


def backbone_in(state_dict: dict) -> str | None:
    """Which of our backbones a detector state dict's backbone.* entries are (None: none of them), by
    each library's layout: ResNet's layer1-4, MobileNetV2's features.*, EfficientNet's conv_stem and
    blocks.*, ShuffleNetV2's stage2-4 (its width from the channels of stage2, the only difference
    between x0.5 and x2.0 besides the channels that follow). ResNet's depth is the caller's to read."""
    if "backbone.layer1.0.conv1.weight" in state_dict:
        return "resnet"
    if "backbone.features.0.0.weight" in state_dict:
        return "mobilenet_v2"
    if "backbone.conv_stem.weight" in state_dict and "backbone.blocks.0.0.conv_dw.weight" in state_dict:
        return "efficientnet_lite0"
    first_block = state_dict.get("backbone.stage2.0.branch2.0.weight")  # [stage2 channels / 2, C_stem, 1, 1]
    if first_block is not None:
        stage2_channels = 2 * first_block.shape[0]
        return next((name for name, (_, channels) in shufflenet_v2.WIDTHS.items() if channels[1] == stage2_channels),
                    None)
    return None


def weights_file(config: ModelConfig) -> str:
    """The ImageNet file --backbone-weights expects for this backbone (for error messages)."""
    name = config.backbone
    if name == "resnet":
        return f"torchvision's resnet{config.depth} state dict (resnet{config.depth}-*.pth)"
    if name == "mobilenet_v2":
        return "torchvision's mobilenet_v2 state dict (mobilenet_v2-b0353104.pth or -7ebf99e0.pth)"
    if name in TV_SHUFFLENET_FILES:
        return f"torchvision's {name} state dict ({TV_SHUFFLENET_FILES[name]})"
    return ("timm's efficientnet_lite0 state dict (efficientnet_lite0_ra-37913777.pth, or the model.safetensors "
            "of timm/efficientnet_lite0.ra_in1k)")
