"""The row layout: how per-level head maps become the rows that losses, the teacher cache and
inspection share, and back.

A view's rows are its prior locations: level-major (P3 first), then y, then x, the order in which
mmdetection flattens anchors. In a batch each image contributes the locations of its OWN padded
size on every level (not the batch canvas), images concatenated in batch order; locations in the
batch padding beyond an image's own size are not rows at all (mmdetection's valid-flag masking)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TeacherRows(NamedTuple):
    """Teacher logits row-aligned with the student's rows."""

    box: torch.Tensor  # [N, 4(n+1)] float32
    cls: torch.Tensor | None  # [N, C] float32, None when the source holds no class logits
    holes: bool = False  # box rows the source does not hold are NaN (a region-sparse cache)
    edges: torch.Tensor | None = None  # [N, 4] the expected edge distances (stride units), where the
    # source stores them instead of every box logit (an ld+bckd cache); else the box rows' integral


def image_level_rows(level_map: torch.Tensor, image: int, hw: tuple[int, int]) -> torch.Tensor:
    """One image's locations of one level: maps [B, K, H, W] -> rows [h * w, K]."""
    h, w = hw
    return level_map[image, :, :h, :w].permute(1, 2, 0).reshape(h * w, -1)


def flatten_rows(maps_per_level: list[torch.Tensor], level_hw_per_image: list[tuple]) -> torch.Tensor:
    """Per-level maps [B, K, H_l, W_l] -> rows [N, K] of each image's own locations."""
    full = tuple(tuple(m.shape[-2:]) for m in maps_per_level)
    if all(tuple(map(tuple, hw)) == full for hw in level_hw_per_image):
        # Every image fills the canvas (batches of equal canvas): one reshape per level.
        b, k = maps_per_level[0].shape[:2]
        per_image = torch.cat([m.permute(0, 2, 3, 1).reshape(b, -1, k) for m in maps_per_level], dim=1)
        return per_image.reshape(-1, k)  # [B * n, K]
    return torch.cat([image_level_rows(maps, i, hw) for i, level_hw in enumerate(level_hw_per_image)
                      for maps, hw in zip(maps_per_level, level_hw)], dim=0)


def view_maps(rows: torch.Tensor, level_hw: tuple) -> list[torch.Tensor]:
    """The inverse for one view: rows [n, K] -> per-level maps [K, H_l, W_l] (P3 first)."""
    maps, start = [], 0
    for h, w in level_hw:
        maps.append(rows[start:start + h * w].reshape(h, w, -1).permute(2, 0, 1))
        start += h * w
    return maps


def row_location(level_hw: tuple, row: int) -> tuple[int, int, int]:
    """A view's row index -> (level, y, x)."""
    start = 0
    for level, (h, w) in enumerate(level_hw):
        if row < start + h * w:
            y, x = divmod(row - start, w)
            return level, y, x
        start += h * w
    raise IndexError(f"row {row} is beyond the view's {start} rows")


def row_index(level_hw: tuple, level: int, y: int, x: int) -> int:
    """(level, y, x) -> the view's row index (the inverse of row_location)."""
    start = sum(h * w for h, w in level_hw[:level])
    return start + y * level_hw[level][1] + x
