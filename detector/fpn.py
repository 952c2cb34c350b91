"""FPN on C3-C5 with two extra levels computed from the P5 *output* (mmdet's
add_extra_convs='on_output'): P3-P7, no normalisation, nearest upsampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detector.layers import ConvBlock


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int, num_extra: int = 2):
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvBlock(c, out_channels, 1) for c in in_channels)
        # fpn_convs holds the 3x3 output convs of P3-P5 followed by the stride-2 extra convs (P6, P7).
        outputs = [ConvBlock(out_channels, out_channels, 3) for _ in in_channels]
        extras = [ConvBlock(out_channels, out_channels, 3, stride=2) for _ in range(num_extra)]
        self.fpn_convs = nn.ModuleList(outputs + extras)
        self.num_inputs = len(in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [self.fpn_convs[i](laterals[i]) for i in range(self.num_inputs)]
        for conv in self.fpn_convs[self.num_inputs:]:
            outs.append(conv(outs[-1]))  # no ReLU before the extra convs
        return outs  # P3..P7
