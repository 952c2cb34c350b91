"""ModelConfig: the architecture of a GFL detector (the config toolkit is core/config.py).

ModelConfig's defaults are mmdetection's GFL configuration (R-50, 256 channels, 4 stacked convs,
reg_max 16, P3-P7 at strides 8-128, 80 classes). The small-model options (base_width,
fpn_channels, head_channels, stacked_convs) shrink the network for CPU work without changing any
state-dict key name, so small and full-size models share one checkpoint format. `backbone` picks
ResNet (depth, base_width) or a light-weight ImageNet backbone (detector/backbones/); a config
without the field (an older checkpoint's) is a ResNet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from core.config import build_config, check, param, validate_fields
from core.domains import Flag, OneOf, Range

RESNET_DEPTHS = (18, 34, 50, 101)
GFL_STRIDES = (8, 16, 32, 64, 128)
# Backbone name -> its number of stages after the stem (what frozen_stages counts; detector/backbones/).
BACKBONE_STAGES = {"resnet": 4, "mobilenet_v2": 4, "shufflenet_v2_x0_5": 3, "shufflenet_v2_x1_0": 3,
                   "shufflenet_v2_x1_5": 3, "shufflenet_v2_x2_0": 3, "efficientnet_lite0": 4}


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = param("resnet", "backbone: resnet (with --depth) or a light-weight one, named as torchvision / "
                                    "timm name the model", OneOf(*BACKBONE_STAGES))
    depth: int = param(50, "ResNet depth: 18, 34, 50 or 101 (--backbone resnet only)", OneOf(*RESNET_DEPTHS))
    num_classes: int = param(80, "foreground classes (sigmoid, no background channel)", Range(1, 100_000),
                             shown="the dataset's")
    base_width: int = param(64, "ResNet stem channels; stages use 1, 2, 4, 8 times this (64 = standard; "
                                "--backbone resnet only)", Range(1, 1024))
    fpn_channels: int = param(256, "FPN output channels (= head input channels)", Range(1, 4096))
    head_channels: int = param(256, "channels of the GFL head's cls and reg towers", Range(1, 4096))
    stacked_convs: int = param(4, "convs per head tower", Range(0, 16))
    gn_groups: int = param(32, "GroupNorm groups in the head towers (a divisor of --head-channels, with at least 2 "
                               "channels per group)", Range(1, 2048))
    reg_max: int = param(16, "box distributions have reg_max + 1 bins per edge", Range(1, 255))
    strides: tuple[int, ...] = param(GFL_STRIDES, "FPN strides P3-P7", OneOf(GFL_STRIDES), flag=False)
    frozen_stages: int = param(1, "stem + this many backbone stages get no gradient (0 when training from "
                                  "scratch; ShuffleNetV2 has 3 stages, the others 4)", Range(0, 4))
    norm_eval: bool = param(True, "keep backbone BatchNorm in eval mode (pretrained backbones)", Flag())

    def __post_init__(self):
        if isinstance(self.strides, list):
            object.__setattr__(self, "strides", tuple(self.strides))
        validate_fields(self, "model configuration")
        if self.stacked_convs > 0 and (self.head_channels % self.gn_groups or self.head_channels < 2 * self.gn_groups):
            # Two channels per group at least: a group of one channel on a 1x1 map (P7 of a small
            # image) has a single value, which GroupNorm cannot normalise while training.
            check([f"head_channels ({self.head_channels}) must be a multiple of gn_groups ({self.gn_groups}) with "
                   "at least 2 channels per group"], "model configuration")
        if self.backbone != "resnet" and (self.depth, self.base_width) != (50, 64):
            check([f"depth and base_width are ResNet options (given {self.depth}, {self.base_width}); leave them at "
                   f"50 and 64 with backbone {self.backbone}"], "model configuration")
        if self.frozen_stages > BACKBONE_STAGES[self.backbone]:
            check([f"frozen_stages ({self.frozen_stages}) exceeds the {BACKBONE_STAGES[self.backbone]} stages of "
                   f"backbone {self.backbone}"], "model configuration")

    @property
    def backbone_name(self) -> str:
        """The backbone as messages print it: "R-50", "R-18 x0.25 width" (a ResNet of base_width 16),
        or the light-weight backbone's own name ("mobilenet_v2", "shufflenet_v2_x1_0", ...)."""
        if self.backbone != "resnet":
            return self.backbone
        return f"R-{self.depth}" + (f" x{self.base_width / 64:g} width" if self.base_width != 64 else "")

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def box_channels(self) -> int:
        return 4 * (self.reg_max + 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["strides"] = list(self.strides)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return build_config(cls, d, "model")


# The fields that describe a trained network (what a checkpoint may not record, e.g. mmdetection's).
ARCH_FIELDS = ("backbone", "depth", "base_width", "fpn_channels", "head_channels", "stacked_convs", "gn_groups",
               "reg_max", "num_classes")
