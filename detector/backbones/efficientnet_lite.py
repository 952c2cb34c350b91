"""EfficientNet-Lite0 with timm's state-dict names (timm.create_model("efficientnet_lite0")), so its
ImageNet file (efficientnet_lite0_ra-37913777.pth) loads as it is.

As timm builds it: ReLU6, no squeeze-excitation, symmetric padding (k - 1) // 2, BatchNorm eps
1e-5 and momentum 0.1, stem conv_stem + bn1 (32 ch, stride 2), then blocks.0-6: one
depthwise-separable block (blocks.0) and inverted residuals. timm's head (conv_head.*, bn2.*,
classifier.*) is not built. Outputs: C3 after blocks.2 (40 ch, stride 8), C4 after blocks.4
(112, 16), C5 after blocks.6 (320, 32). frozen_stages counts: stem = conv_stem, bn1 and blocks.0
(stride 2), stage 1 = blocks.1 (stride 4), stage 2 = blocks.2 (C3), stage 3 = blocks.3-4 (C4),
stage 4 = blocks.5-6 (C5)."""

from __future__ import annotations

import math

import torch
from torch import nn

from detector.backbones.freezing import StagedBackbone, outputs_at

HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")  # timm's classifier: dropped when loading its file
# (blocks, kernel, stride, expansion, channels) of blocks.0-6: timm's arch_def for efficientnet_lite0
ARCH = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
        (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
OUT_INDICES = (2, 4, 6)  # blocks.i whose outputs are C3, C4, C5
STAGE_ENDS = (1, 2, 3, 5, 7)  # blocks[a:b] in the stem (with conv_stem, bn1) and stages 1-4


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                     bias=False)


class DepthwiseSeparable(nn.Module):
    """blocks.0: depthwise conv, BN + ReLU6, pointwise conv, BN (no activation, no skip: 32 -> 16)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_dw = conv(in_channels, in_channels, kernel_size, stride, groups=in_channels)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv_pw = conv(in_channels, out_channels, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.act(self.bn1(self.conv_dw(x)))))
        return out + x if self.has_skip else out


class InvertedResidual(nn.Module):
    """1x1 expansion (BN, ReLU6), depthwise k x k (BN, ReLU6), 1x1 projection (BN); skip at stride 1
    with equal channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_pw = conv(in_channels, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv_dw = conv(hidden, hidden, kernel_size, stride, groups=hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv_pwl = conv(hidden, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv_pw(x)))
        out = self.act(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.has_skip else out


class EfficientNetLite0(StagedBackbone):
    def __init__(self, frozen_stages: int = 1, norm_eval: bool = True):
        super().__init__(frozen_stages, norm_eval)
        self.conv_stem = conv(3, 32, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(32)
        self.act = nn.ReLU6(inplace=True)
        blocks, in_channels = [], 32
        for i, (n, k, s, e, c) in enumerate(ARCH):
            group = []
            for j in range(n):
                stride = s if j == 0 else 1
                group.append(DepthwiseSeparable(in_channels, c, k, stride) if i == 0
                             else InvertedResidual(in_channels, c, k, stride, e))
                in_channels = c
            blocks.append(nn.Sequential(*group))
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = [ARCH[i][4] for i in OUT_INDICES]
        for m in self.modules():  # timm's TensorFlow-style initialisation: fan-out counted per group
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.freeze_stages()

    def stage_groups(self) -> list[nn.Module]:
        """[stem, stage 1, ..., stage 4] (the module docstring says which blocks each holds)."""
        stem = nn.ModuleList([self.conv_stem, self.bn1, self.blocks[0]])
        return [stem] + [self.blocks[a:b] for a, b in zip(STAGE_ENDS[:-1], STAGE_ENDS[1:])]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return outputs_at(self.act(self.bn1(self.conv_stem(x))), self.blocks, OUT_INDICES)  # C3-C5: strides 8-32
