"""Deterministic view geometry and the view transform shared by teacher and student.

A *view* is (image, flip, img_scale). Its geometry is decided here, on the data side, from the
image's original size alone, so the cache can lay out its rows before any teacher runs and the
student can rebuild its exact input later. Nothing here is random: randomness (which view an
image gets this epoch) lives in the sampler.

Geometry follows mmdetection's 1x pipeline: keep-ratio resize so that the long side fits
img_scale[0] and the short side fits img_scale[1] (new side = int(side * scale + 0.5)), optional
horizontal flip of the resized image, RGB normalisation, zero padding bottom/right to a multiple
of 32 (after normalisation, as mmdet's data preprocessor pads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.domains import Domain, is_int, quote

PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, mmdet / ImageNet
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISOR = 32
DEFAULT_IMG_SCALE = (1333, 800)  # (long side, short side), mmdet's 1x
MAX_SIDE = 16384  # px: no run needs a longer side; it would only exhaust memory


@dataclass(frozen=True)
class ViewSpec:
    """What distinguishes the views of one image: flip and the target scale."""

    flip: bool
    img_scale: tuple[int, int]  # (long, short)

    def __post_init__(self):
        long_side, short_side = self.img_scale
        if not (long_side >= short_side > 0):
            raise ValueError(f"img_scale must be (long, short) with long >= short > 0, got {self.img_scale}")

    @property
    def name(self) -> str:
        base = "hflip" if self.flip else "orig"
        return f"{base}@{self.img_scale[0]}x{self.img_scale[1]}"


def parse_views(views: str, img_scale: tuple[int, int],
                extra_scales: tuple[tuple[int, int], ...] = ()) -> list[ViewSpec]:
    """'orig,hflip' (+ extra scales) -> the ordered list of view specs, one per (scale, flip)."""
    kinds = [v.strip() for v in views.split(",") if v.strip()]
    unknown = [k for k in kinds if k not in ("orig", "hflip")]
    if unknown or not kinds:
        raise ValueError(f"unknown view kind(s) {unknown or views!r}: use a comma list of 'orig' and 'hflip'")
    specs = []
    for scale in (tuple(img_scale), *map(tuple, extra_scales)):
        for kind in dict.fromkeys(kinds):  # de-duplicate, keep order
            specs.append(ViewSpec(flip=kind == "hflip", img_scale=scale))
    return specs


@dataclass(frozen=True)
class ViewRecord:
    """Everything needed to rebuild a view's network input bit for bit, and to lay out its rows."""

    image_id: int
    flip: bool
    img_scale: tuple[int, int]  # (long, short) the image was fitted to
    orig_hw: tuple[int, int]  # the image file's (height, width)
    resized_hw: tuple[int, int]  # after keep-ratio resize; boxes are clipped to this
    padded_hw: tuple[int, int]  # resized_hw rounded up to SIZE_DIVISOR
    level_hw: tuple[tuple[int, int], ...]  # feature map size per FPN level, P3 first

    @property
    def scale_factor(self) -> tuple[float, float]:
        """(w_scale, h_scale): resized / original, per axis (mmdet's scale_factor)."""
        return self.resized_hw[1] / self.orig_hw[1], self.resized_hw[0] / self.orig_hw[0]

    @property
    def level_rows(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.level_hw)

    @property
    def num_rows(self) -> int:
        """Number of prior locations of this view over all levels (= rows in the cache)."""
        return sum(self.level_rows)


def rescale_size(orig_hw: tuple[int, int], img_scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio fit of (h, w) into img_scale = (long, short); mmcv's rescale_size rule."""
    h, w = orig_hw
    long_side, short_side = img_scale
    scale = min(long_side / max(h, w), short_side / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def level_sizes(padded_hw: tuple[int, int], strides: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    # Every stride-2 conv of the network (k3 p1 or the 7x7 stem) maps n to ceil(n / 2), and nested
    # ceilings of halving equal one ceiling of the division, so each level is ceil(padded / stride).
    return tuple((math.ceil(padded_hw[0] / s), math.ceil(padded_hw[1] / s)) for s in strides)


def plan_view(
    image_id: int,
    orig_hw: tuple[int, int],
    spec: ViewSpec,
    strides: tuple[int, ...] = (8, 16, 32, 64, 128),
) -> ViewRecord:
    """The view's geometry from the original size only (no pixels needed)."""
    if orig_hw[0] < 1 or orig_hw[1] < 1:
        raise ValueError(f"image {image_id} has an invalid size {orig_hw}")
    resized = rescale_size(orig_hw, spec.img_scale)
    padded = tuple(math.ceil(s / SIZE_DIVISOR) * SIZE_DIVISOR for s in resized)
    return ViewRecord(
        image_id=int(image_id),
        flip=bool(spec.flip),
        img_scale=tuple(spec.img_scale),
        orig_hw=tuple(int(v) for v in orig_hw),
        resized_hw=resized,
        padded_hw=padded,
        level_hw=level_sizes(padded, strides),
    )


def build_view_input(image_rgb: torch.Tensor, record: ViewRecord) -> torch.Tensor:
    """uint8 image [3, H, W] (RGB, original size) -> normalised, padded float input [3, Hp, Wp].

    Resizing is bilinear without antialiasing (half-pixel centres), which is what OpenCV's
    INTER_LINEAR, and hence mmdetection, does; the result depends only on the pixels and the record,
    not on the device or the number of threads.
    """
    if image_rgb.dim() != 3 or image_rgb.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image_rgb.shape)}")
    if tuple(image_rgb.shape[1:]) != record.orig_hw:
        raise ValueError(
            f"image {record.image_id} is {tuple(image_rgb.shape[1:])} (h, w) but its annotation says "
            f"{record.orig_hw}; fix the annotation's width/height"
        )
    x = image_rgb.to(torch.float32)[None]  # [1, 3, H, W]
    if record.resized_hw != record.orig_hw:
        x = bilinear_resize(x, record.resized_hw)
        x = x.round_().clamp_(0, 255)  # back on the uint8 grid, like an image library would store it
    if record.flip:
        x = x.flip(-1)
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    pad_h = record.padded_hw[0] - record.resized_hw[0]
    pad_w = record.padded_hw[1] - record.resized_hw[1]
    x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
    return x[0].contiguous()  # [3, Hp, Wp]


def _taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source index pairs and weights of half-pixel-centred linear interpolation along one axis."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    return lo, hi, (src - lo).to(torch.float32)


def bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] float -> [B, C, h, w], bilinear with half-pixel centres, no antialiasing
    (OpenCV's INTER_LINEAR geometry).

    Written as gathers and elementwise arithmetic in a fixed order instead of F.interpolate, whose
    CPU kernel rounds differently with different thread counts: a loader worker (one thread) and a
    multi-threaded dump must build bit-identical inputs."""
    y0, y1, wy = _taps(x.shape[-2], size[0])
    x0, x1, wx = _taps(x.shape[-1], size[1])
    top, bottom = x[..., y0, :], x[..., y1, :]
    rows = top + (bottom - top) * wy[:, None]  # [B, C, h, W]
    left, right = rows[..., x0], rows[..., x1]
    return left + (right - left) * wx  # [B, C, h, w]


def transform_boxes(boxes_xyxy: torch.Tensor, record: ViewRecord) -> torch.Tensor:
    """Boxes in original pixels [N, 4] -> the view's pixels: scale, clip to the resized image, flip."""
    w_scale, h_scale = record.scale_factor
    scale = boxes_xyxy.new_tensor([w_scale, h_scale, w_scale, h_scale])
    out = boxes_xyxy * scale
    h, w = record.resized_hw
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    if record.flip:
        out = torch.stack([w - out[:, 2], out[:, 1], w - out[:, 0], out[:, 3]], dim=1)
    return out


def boxes_to_original(boxes_xyxy: torch.Tensor, record: ViewRecord) -> torch.Tensor:
    """Inverse of transform_boxes (without the clipping): view pixels -> original image pixels."""
    out = boxes_xyxy
    if record.flip:
        w = record.resized_hw[1]
        out = torch.stack([w - out[:, 2], out[:, 1], w - out[:, 0], out[:, 3]], dim=1)
    w_scale, h_scale = record.scale_factor
    return out / out.new_tensor([w_scale, h_scale, w_scale, h_scale])


# ---- what a user may give for scales and views (domains: core.domains) ----------------------
class Scale(Domain):
    """LONG,SHORT of a keep-ratio resize (also LONGxSHORT, or a TOML [LONG, SHORT])."""

    allowed = f"LONG,SHORT with {MAX_SIDE} >= LONG >= SHORT > 0 (such as 1333,800)"
    metavar = "LONG,SHORT"

    def parse(self, text: str):
        try:
            a, b = (int(v) for v in text.replace("x", ",").split(","))
        except ValueError:
            raise ValueError(f"must be {self.allowed}, got {quote(text)}") from None
        return a, b

    def coerce(self, value):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        return super().coerce(value)

    def valid(self, value) -> bool:
        return (isinstance(value, tuple) and len(value) == 2 and all(is_int(v) for v in value)
                and MAX_SIDE >= value[0] >= value[1] > 0)


class Scales(Domain):
    """More scales: 'L1,S1;L2,S2' (or a TOML list of pairs); empty for none."""

    allowed = f"scales 'L1,S1;L2,S2', each with {MAX_SIDE} >= LONG >= SHORT > 0"
    metavar = "L1,S1;L2,S2"

    def parse(self, text: str):
        return tuple(Scale().parse(part) for part in text.split(";") if part.strip())

    def coerce(self, value):
        if isinstance(value, (list, tuple)):
            return tuple(Scale().coerce(v) for v in value)
        return super().coerce(value)

    def valid(self, value) -> bool:
        return isinstance(value, tuple) and all(Scale().valid(v) for v in value)


VIEW_KINDS = ("orig", "hflip")


class Views(Domain):
    """The views of an image: a comma list of orig and hflip."""

    allowed = "a comma list of " + " and ".join(VIEW_KINDS) + " such as orig,hflip"
    metavar = "orig,hflip"

    def valid(self, value) -> bool:
        if not isinstance(value, str):
            return False
        kinds = [v.strip() for v in value.split(",")]
        return bool(value.strip()) and all(k in VIEW_KINDS for k in kinds)
