"""frozen_stages and norm_eval for the light-weight backbones, as ResNet applies them.

A backbone lists its parameter groups as [stem, stage 1, stage 2, ...]. With frozen_stages = n >= 1
the stem and stages 1..n get no gradient and keep their BatchNorm statistics; n = 0 freezes
nothing. With norm_eval every BatchNorm stays in eval mode while training: detection batches are
too small to estimate the statistics an ImageNet backbone brings."""

from __future__ import annotations

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
