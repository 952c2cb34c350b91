"""ModelConfig: the architecture of a GFL detector, as data.

Defaults are mmdetection's GFL configuration (R-50, 256 channels, 4 stacked convs, reg_max 16,
P3-P7 at strides 8-128, 80 classes). The small-model options (base_width, fpn_channels,
head_channels, stacked_convs) shrink the network for CPU work without changing any state-dict key
name, so small and full-size models share one checkpoint format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from detector.errors import UserError

RESNET_DEPTHS = (18, 34, 50, 101)
GFL_STRIDES = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class ModelConfig:
    depth: int = 50  # ResNet depth: 18, 34, 50 or 101
    num_classes: int = 80  # foreground classes (sigmoid, no background channel)
    base_width: int = 64  # channels of the ResNet stem; stages use 1, 2, 4, 8 times this
    fpn_channels: int = 256  # FPN output channels (= head input channels)
    head_channels: int = 256  # channels of the cls and reg towers
    stacked_convs: int = 4  # convs per tower
    gn_groups: int = 32  # GroupNorm groups in the towers
    reg_max: int = 16  # box distributions have reg_max + 1 bins per edge
    strides: tuple[int, ...] = GFL_STRIDES
    frozen_stages: int = 1  # stem + this many ResNet stages get no gradient
    norm_eval: bool = True  # backbone BatchNorm stays in eval mode while training

    def __post_init__(self):
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        problems = []
        if self.depth not in RESNET_DEPTHS:
            problems.append(f"depth must be one of {RESNET_DEPTHS}, got {self.depth}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.base_width < 1 or self.fpn_channels < 1 or self.head_channels < 1:
            problems.append("base_width, fpn_channels and head_channels must be positive")
        if self.stacked_convs < 0:
            problems.append(f"stacked_convs must be >= 0, got {self.stacked_convs}")
        if self.stacked_convs > 0 and (self.head_channels % self.gn_groups or self.head_channels < 2 * self.gn_groups):
            # Two channels per group at least: a group of one channel on a 1x1 map (P7 of a small
            # image) has a single value, which GroupNorm cannot normalise while training.
            problems.append(f"head_channels ({self.head_channels}) must be a multiple of gn_groups "
                            f"({self.gn_groups}) with at least 2 channels per group")
        if self.reg_max < 1:
            problems.append(f"reg_max must be >= 1, got {self.reg_max}")
        if self.strides != GFL_STRIDES:
            problems.append(f"strides must be {GFL_STRIDES} (FPN P3-P7), got {self.strides}")
        if not 0 <= self.frozen_stages <= 4:
            problems.append(f"frozen_stages must be in 0..4, got {self.frozen_stages}")
        if problems:
            raise UserError("invalid model configuration: " + "; ".join(problems))

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
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model configuration keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)
