"""Priors of the GFL head: one square anchor per feature-map location, side 8 x stride, centred on
(x * stride, y * stride). Rows are level-major, then y, then x (the cache's row order)."""

from __future__ import annotations

import torch

ANCHOR_SCALE = 8  # anchor side in strides (mmdet's octave_base_scale)


def level_priors(hw: tuple[int, int], stride: int, device=None) -> torch.Tensor:
    """Anchors [H*W, 4] (xyxy pixels) of one level."""
    h, w = hw
    ys = torch.arange(h, device=device, dtype=torch.float32) * stride
    xs = torch.arange(w, device=device, dtype=torch.float32) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    half = ANCHOR_SCALE * stride / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1)


def image_priors(level_hw: tuple[tuple[int, int], ...], strides: tuple[int, ...], device=None):
    """All levels of one image: anchors [N, 4], stride per row [N], level index per row [N]."""
    anchors = [level_priors(hw, s, device) for hw, s in zip(level_hw, strides)]
    counts = [a.shape[0] for a in anchors]
    stride_per_row = torch.cat([torch.full((n,), float(s), device=device) for n, s in zip(counts, strides)])
    level_per_row = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
    return torch.cat(anchors), stride_per_row, level_per_row


def anchor_centres(anchors: torch.Tensor) -> torch.Tensor:
    return torch.stack([(anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2], dim=-1)
