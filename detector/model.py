"""The GFL detector (backbone + FPN + GFL head) and its factory; the backbone is ModelConfig.backbone
(detector/backbones/), and the FPN reads its last three maps, C3-C5.

forward(images) returns the raw head outputs only; assignment, losses and decoding live outside
the model so that cached teacher maps can stand in for a live teacher."""

from __future__ import annotations

import torch
from torch import nn

from detector.backbones import build_backbone
from detector.config import ModelConfig
from detector.fpn import FPN
from detector.gfl_head import GFLHead


class GFL(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.neck = FPN(self.backbone.out_channels[-3:], config.fpn_channels, num_extra=config.num_levels - 3)
        self.bbox_head = GFLHead(
            num_classes=config.num_classes,
            in_channels=config.fpn_channels,
            feat_channels=config.head_channels,
            stacked_convs=config.stacked_convs,
            gn_groups=config.gn_groups,
            reg_max=config.reg_max,
            num_levels=config.num_levels,
        )

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """images [B, 3, H, W] (normalised, H and W multiples of 32) ->
        (cls logits per level [B, C, H_l, W_l], box logits per level [B, 4(n+1), H_l, W_l])."""
        c3, c4, c5 = self.backbone(images)[-3:]  # strides 8, 16, 32
        return self.bbox_head(self.neck([c3, c4, c5]))


def build_detector(config: ModelConfig) -> GFL:
    return GFL(config)
