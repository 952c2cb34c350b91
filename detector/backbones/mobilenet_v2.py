"""MobileNetV2 with torchvision's state-dict names (torchvision.models.mobilenet_v2, width 1.0), so
its ImageNet file (mobilenet_v2-b0353104.pth or -7ebf99e0.pth) loads as it is.

features.0 is the stem conv, features.1-17 the inverted-residual blocks; torchvision's
classification head (features.18, the 1x1 conv to 1280, and classifier.*) is not built.
Outputs: C3 after features.6 (32 ch, stride 8), C4 after features.13 (96, 16), C5 after
features.17 (320, 32). frozen_stages counts: stem = features.0-1 (stride 2), stage 1 =
features.2-3 (stride 4), stage 2 = 4-6 (C3), stage 3 = 7-13 (C4), stage 4 = 14-17 (C5)."""

from __future__ import annotations

import torch
from torch import nn

from detector.backbones.freezing import StagedBackbone, outputs_at

HEAD_PREFIXES = ("features.18.", "classifier.")  # torchvision's classifier: dropped when loading its file
# (expansion t, channels c, blocks n, stride s) per group: torchvision's inverted_residual_setting
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))
OUT_INDICES = (6, 13, 17)  # features.i whose outputs are C3, C4, C5
STAGE_ENDS = (2, 4, 7, 14, 18)  # features[a:b] of the stem and stages 1-4


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation with ReLU6: children 0 (conv), 1 (BN), 2 (ReLU6)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = [ConvBNReLU6(in_channels, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),  # linear bottleneck: no activation
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(StagedBackbone):
    def __init__(self, frozen_stages: int = 1, norm_eval: bool = True):
        super().__init__(frozen_stages, norm_eval)
        features: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        in_channels = 32
        for t, c, n, s in SETTING:
            for i in range(n):
                features.append(InvertedResidual(in_channels, c, s if i == 0 else 1, t))
                in_channels = c
        self.features = nn.Sequential(*features)
        self.out_channels = [32, 96, 320]
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.freeze_stages()

    def stage_groups(self) -> list[nn.Module]:
        """[stem, stage 1, ..., stage 4] (the module docstring says which features each holds)."""
        return [self.features[a:b] for a, b in zip((0, *STAGE_ENDS[:-1]), STAGE_ENDS)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return outputs_at(x, self.features, OUT_INDICES)  # C3, C4, C5: strides 8, 16, 32
