"""Small building blocks whose attribute names match mmdetection's (ConvModule -> .conv/.gn,
Scale -> .scale), so state dicts load strictly."""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    """conv (+ GroupNorm, + ReLU). With GroupNorm the conv has no bias, as in mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 gn_groups: int | None = None, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                              bias=gn_groups is None)
        self.gn = nn.GroupNorm(gn_groups, out_channels) if gn_groups else None
        self.act = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.gn is not None:
            x = self.gn(x)
        if self.act is not None:
            x = self.act(x)
        return x


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level on the box branch)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale
