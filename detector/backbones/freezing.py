"""frozen_stages and norm_eval for the light-weight backbones, as ResNet applies them.

A backbone lists its parameter groups as [stem, stage 1, stage 2, ...]. With frozen_stages = n >= 1
the stem and stages 1..n get no gradient and keep their BatchNorm statistics; n = 0 freezes
nothing. With norm_eval every BatchNorm stays in eval mode while training: detection batches are
too small to estimate the statistics an ImageNet backbone brings."""

from __future__ import annotations

import torch
from torch import nn


def frozen_groups(groups: list[nn.Module], frozen_stages: int) -> list[nn.Module]:
    return groups[: frozen_stages + 1] if frozen_stages >= 1 else []


def freeze(groups: list[nn.Module], frozen_stages: int) -> None:
    """Stem + the first frozen_stages stages: requires_grad off (called once, at construction)."""
    for group in frozen_groups(groups, frozen_stages):
        for p in group.parameters():
            p.requires_grad_(False)


def hold_statistics(backbone: nn.Module, groups: list[nn.Module], frozen_stages: int, norm_eval: bool) -> None:
    """After backbone.train(True): frozen groups, and with norm_eval every BatchNorm, back to eval."""
    for group in frozen_groups(groups, frozen_stages):
        group.eval()
    if norm_eval:
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


class StagedBackbone(nn.Module):
    """What the light-weight backbones share: frozen_stages and norm_eval applied to their
    stage_groups() ([stem, stage 1, ...]). A subclass builds its layers, then calls freeze_stages()."""

    def __init__(self, frozen_stages: int, norm_eval: bool):
        super().__init__()
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval

    def stage_groups(self) -> list[nn.Module]:
        raise NotImplementedError

    def freeze_stages(self) -> None:
        freeze(self.stage_groups(), self.frozen_stages)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            hold_statistics(self, self.stage_groups(), self.frozen_stages, self.norm_eval)
        return self


def outputs_at(x: torch.Tensor, layers, out_indices: tuple[int, ...]) -> list[torch.Tensor]:
    """Run x through layers in order; the outputs of the layers at out_indices."""
    outs = []
    for i, layer in enumerate(layers):
        x = layer(x)
        if i in out_indices:
            outs.append(x)
    return outs
