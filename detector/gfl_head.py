"""The GFL head: shared cls and reg towers applied to every level, a sigmoid class branch (no
background channel) and a box branch of 4 x (reg_max + 1) distribution logits per location."""

from __future__ import annotations

import math

import torch
from torch import nn

from detector.distributions import integral
from detector.layers import ConvBlock, Scale


class Integral(nn.Module):
    """Expected value of each edge's distribution: softmax(logits) . [0, 1, ..., reg_max].

    Holds `project` as a buffer because mmdetection's checkpoints carry it (key
    bbox_head.integral.project)."""

    def __init__(self, reg_max: int):
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))

    def forward(self, box_logits: torch.Tensor) -> torch.Tensor:
        # [..., 4 * (reg_max + 1)] -> [..., 4] distances in stride units (project holds 0..reg_max)
        return integral(box_logits, self.reg_max)


class GFLHead(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, feat_channels: int, stacked_convs: int,
                 gn_groups: int, reg_max: int, num_levels: int):
        super().__init__()
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for i in range(stacked_convs):
            c_in = in_channels if i == 0 else feat_channels
            self.cls_convs.append(ConvBlock(c_in, feat_channels, 3, gn_groups=gn_groups, relu=True))
            self.reg_convs.append(ConvBlock(c_in, feat_channels, 3, gn_groups=gn_groups, relu=True))
        tower_out = feat_channels if stacked_convs else in_channels
        self.gfl_cls = nn.Conv2d(tower_out, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(tower_out, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self.integral = Integral(reg_max)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Start every class at probability 0.01 so the focal-style loss is not swamped by the
        # many easy negatives in the first iterations.
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls_logits_per_level, box_logits_per_level = [], []
        for x, scale in zip(feats, self.scales):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls_logits_per_level.append(self.gfl_cls(cls_feat))  # [B, C, H, W]
            # Box logits in fp32 even under autocast: they feed softmaxes with temperature.
            box_logits_per_level.append(scale(self.gfl_reg(reg_feat)).float())  # [B, 4(n+1), H, W]
        return cls_logits_per_level, box_logits_per_level
