"""Drawing primitives of the synthetic dataset: class shapes, clutter, backgrounds and blur.

Every class is an inside-test on normalised box coordinates (u, v in [-1, 1]) whose extreme
points touch all four sides of the box, so stretching a shape to any size and aspect ratio keeps
its bounding box exactly equal to the box: the amodal ground truth is known analytically, never
measured from pixels (where blur and occlusion would bias it). Coverage is the fraction of
supersampled points inside (anti-aliasing); a soft edge is that coverage blurred with a separable
Gaussian. All functions are pure numpy and take a numpy Generator where they need randomness.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable

import numpy as np

# Order matters: num_classes=K uses the first K, so the most distinct shapes come first.
SHAPES = ("ellipse", "rectangle", "triangle", "ring", "cross", "star", "diamond", "frame")

Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (u, v) -> bool mask, same shape


def sample_shape_params(name: str, rng: np.random.Generator) -> dict:
    """Per-object variation of a class shape (orientation, thickness, ...), all in box units."""
    if name == "rectangle":
        return {"corner": float(rng.uniform(0.0, 0.3))}
    if name == "triangle":
        return {"turn": int(rng.integers(4)), "apex": float(rng.uniform(-1.0, 1.0))}
    if name == "ring":
        return {"inner": float(rng.uniform(0.45, 0.7))}
    if name == "cross":
        return {"half_width": float(rng.uniform(0.22, 0.42))}
    if name == "star":
        return {"points": int(rng.integers(5, 7)), "inner": float(rng.uniform(0.38, 0.55)),
                "turn": float(rng.uniform(0.0, 2.0 * math.pi))}
    if name == "frame":
        return {"inner": float(rng.uniform(0.5, 0.75))}
    return {}


def shape_inside(name: str, params: dict) -> Inside:
    """The inside-test of one class shape; every test is clipped to the box [-1, 1]^2."""
    if name == "ellipse":
        return lambda u, v: u * u + v * v <= 1.0
    if name == "rectangle":
        r = params["corner"]

        def rounded(u, v):
            du = np.maximum(np.abs(u) - (1.0 - r), 0.0)
            dv = np.maximum(np.abs(v) - (1.0 - r), 0.0)
            return _in_box(u, v) & (du * du + dv * dv <= r * r)
        return rounded
    if name == "triangle":
        apex = params["apex"]
        verts = np.array([(apex, -1.0), (1.0, 1.0), (-1.0, 1.0)])
        for _ in range(params["turn"]):  # quarter turns keep the vertices on the box sides
            verts = np.stack([-verts[:, 1], verts[:, 0]], axis=1)
        return lambda u, v: _in_polygon(u, v, verts)
    if name == "ring":
        inner2 = params["inner"] ** 2
        return lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= inner2)
    if name == "cross":
        t = params["half_width"]
        return lambda u, v: _in_box(u, v) & ((np.abs(u) <= t) | (np.abs(v) <= t))
    if name == "star":
        n = params["points"]
        angles = params["turn"] + np.arange(2 * n) * math.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, params["inner"])
        verts = _fit_to_box(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))
        return lambda u, v: _in_polygon(u, v, verts)
    if name == "diamond":
        return lambda u, v: np.abs(u) + np.abs(v) <= 1.0
    if name == "frame":
        t = params["inner"]
        return lambda u, v: _in_box(u, v) & ((np.abs(u) > t) | (np.abs(v) > t))
    raise ValueError(f"unknown shape {name!r}")


def blob_inside(rng: np.random.Generator) -> Inside:
    """A clutter blob: a wobbly potato cut by a random half-plane, so it matches no class shape."""
    amps = rng.uniform(0.08, 0.25, size=3)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=3)
    cut = rng.uniform(0.0, 2.0 * math.pi)
    offset = rng.uniform(-0.4, 0.6)

    def inside(u, v):
        theta = np.arctan2(v, u)
        radius = 1.0 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 5), amps, phases))
        return (np.hypot(u, v) * 1.8 <= radius) & (u * math.cos(cut) + v * math.sin(cut) <= offset)
    return inside


def rasterise(inside: Inside, box_xywh, x0: int, y0: int, width: int, height: int,
              supersample: int) -> np.ndarray:
    """Coverage in [0, 1] of the pixels [x0, x0+width) x [y0, y0+height) by a shape in a box."""
    bx, by, bw, bh = box_xywh
    ss = supersample
    offsets = (np.arange(ss) + 0.5) / ss  # sample points inside each pixel
    xs = (x0 + np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    ys = (y0 + np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    u = ((xs - bx) / bw * 2.0 - 1.0)[None, :]  # [1, width * ss]
    v = ((ys - by) / bh * 2.0 - 1.0)[:, None]  # [height * ss, 1]
    u, v = np.broadcast_arrays(u, v)
    mask = inside(u, v).reshape(height, ss, width, ss)
    return mask.mean(axis=(1, 3), dtype=np.float32)  # [height, width]


def segment_coverage(p0, p1, line_width: float, x0: int, y0: int, width: int,
                     height: int) -> np.ndarray:
    """Anti-aliased coverage of a thick line segment (pixel coordinates) over a pixel window."""
    px = x0 + np.arange(width, dtype=np.float32)[None, :] + 0.5
    py = y0 + np.arange(height, dtype=np.float32)[:, None] + 0.5
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = ((px - p0[0]) * dx + (py - p0[1]) * dy) / max(dx * dx + dy * dy, 1e-6)
    t = np.clip(t, 0.0, 1.0)
    dist = np.hypot(px - (p0[0] + t * dx), py - (p0[1] + t * dy))
    # A one-pixel linear ramp around the edge approximates the exact area coverage.
    return np.clip(line_width / 2.0 + 0.5 - dist, 0.0, 1.0).astype(np.float32)


def gaussian_blur(alpha: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a [H, W] map, zero padded (callers leave a 3-sigma margin)."""
    if sigma < 0.3:  # narrower kernels put >99% of their weight on the centre pixel anyway
        return alpha
    radius = int(math.ceil(3.0 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    out = alpha
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad)
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, w in enumerate(kernel):
            acc += w * (padded[i:i + n] if axis == 0 else padded[:, i:i + n])
        out = acc
    return out


def make_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured RGB background [H, W, 3] float32 in 0..255: gradient, multi-scale noise, and
    sometimes stripes or checkers (straight edges that are not objects)."""
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    image = np.empty((height, width, 3), np.float32)
    image[:] = rng.uniform(30.0, 225.0, size=3)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / max(height, width)  # about [-1.4, 1.4]
    image += ramp[..., None] * rng.uniform(-50.0, 50.0, size=3)
    for cell in (64.0, 24.0, 9.0, 3.0):  # low to high frequency
        amplitude = rng.uniform(0.0, 22.0)
        field = _value_noise(rng, height, width, cell)
        image += field[..., None] * (amplitude * _colour_direction(rng))
    pattern = rng.random()
    if pattern < 0.45:
        period = rng.uniform(5.0, 40.0)
        angle = rng.uniform(0.0, math.pi)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        if pattern < 0.3:
            wave = np.sin(2.0 * math.pi * along / period)
        else:  # checkers: product of two square waves, axes at a random angle
            across = -xs * math.sin(angle) + ys * math.cos(angle)
            wave = np.sign(np.sin(math.pi * along / period) * np.sin(math.pi * across / period))
        image += wave[..., None] * (rng.uniform(6.0, 28.0) * _colour_direction(rng))
    return image


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour (float32, 0..255) of any hue, so that colour says nothing about class."""
    hue, sat, val = rng.uniform(0.0, 1.0), rng.uniform(0.15, 1.0), rng.uniform(0.2, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32) * 255.0


def object_colour(rng: np.random.Generator, background: np.ndarray,
                  low_contrast_prob: float) -> np.ndarray:
    """A fill that stands out from the local background mean, or on purpose barely does."""
    if rng.random() < low_contrast_prob:
        direction = rng.standard_normal(3)
        step = direction / np.linalg.norm(direction) * rng.uniform(10.0, 28.0)
        return np.clip(background + step, 0.0, 255.0).astype(np.float32)
    for _ in range(8):
        colour = random_colour(rng)
        if np.linalg.norm(colour - background) >= 60.0:
            break
    return colour


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth noise [H, W] of unit scale: random values on a grid of `cell` px, interpolated."""
    grid = rng.standard_normal((int(height / cell) + 2, int(width / cell) + 2)).astype(np.float32)
    gy, fy = np.divmod(np.arange(height, dtype=np.float32) / cell, 1.0)
    gx, fx = np.divmod(np.arange(width, dtype=np.float32) / cell, 1.0)
    gy, gx = gy.astype(int), gx.astype(int)
    fy = (fy * fy * (3.0 - 2.0 * fy))[:, None]  # smoothstep hides the grid lines
    fx = (fx * fx * (3.0 - 2.0 * fx))[None, :]
    top = grid[gy][:, gx] * (1.0 - fx) + grid[gy][:, gx + 1] * fx
    bottom = grid[gy + 1][:, gx] * (1.0 - fx) + grid[gy + 1][:, gx + 1] * fx
    return top * (1.0 - fy) + bottom * fy


def _colour_direction(rng: np.random.Generator) -> np.ndarray:
    """A random RGB direction biased towards grey, so texture is mostly brightness, partly hue."""
    d = 1.0 + rng.uniform(-0.8, 0.8, size=3)
    return (d / np.linalg.norm(d) * math.sqrt(3.0)).astype(np.float32)


def _in_box(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)


def _fit_to_box(verts: np.ndarray) -> np.ndarray:
    """Scale and shift polygon vertices [N, 2] so their extent is exactly [-1, 1] on both axes."""
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    return (verts - lo) / (hi - lo) * 2.0 - 1.0


def _in_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points; loops over the few edges."""
    inside = np.zeros(u.shape, bool)
    for (xa, ya), (xb, yb) in zip(verts, np.roll(verts, -1, axis=0)):
        if ya == yb:
            continue  # horizontal edges never cross a horizontal ray
        crosses = (ya > v) != (yb > v)
        x_at = xa + (v - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (u < x_at)
    return inside


def shape_alpha(inside: Inside, box_xywh, sigma: float):
    """Blurred coverage of a shape in a box, on a window with a 3-sigma margin.

    Returns (alpha [h, w] float32, window x, window y, unblurred area in px)."""
    x0, y0 = math.floor(box_xywh[0]), math.floor(box_xywh[1])
    w = math.ceil(box_xywh[0] + box_xywh[2]) - x0
    h = math.ceil(box_xywh[1] + box_xywh[3]) - y0
    # Small shapes get finer supersampling: their edge pixels are a larger share of the box.
    cover = rasterise(inside, box_xywh, x0, y0, w, h, supersample=4 if w * h <= 4096 else 2)
    margin = math.ceil(3.0 * sigma) + 1
    alpha = gaussian_blur(np.pad(cover, margin), sigma)
    return alpha, x0 - margin, y0 - margin, float(cover.sum())


def composite(canvas: np.ndarray, alpha: np.ndarray, ox: int, oy: int, fill) -> None:
    """canvas = canvas * (1 - alpha) + fill * alpha, in place, where the window meets the canvas.

    canvas [H, W, 3]; alpha [h, w] with its top-left pixel at (ox, oy); fill [3] or [h, w, 3]."""
    both = overlap((0, 0), canvas.shape[:2], (oy, ox), alpha.shape)
    if both is None:
        return
    dst, src = both
    a = alpha[src][..., None]
    fill = np.asarray(fill, np.float32)
    canvas[dst] = canvas[dst] * (1.0 - a) + (fill[src] if fill.ndim == 3 else fill) * a


def overlap(origin_a, shape_a, origin_b, shape_b):
    """Slices (into a, into b) of where two windows (top-left (y, x), shape (h, w)) intersect."""
    y0, x0 = max(origin_a[0], origin_b[0]), max(origin_a[1], origin_b[1])
    y1 = min(origin_a[0] + shape_a[0], origin_b[0] + shape_b[0])
    x1 = min(origin_a[1] + shape_a[1], origin_b[1] + shape_b[1])
    if y1 <= y0 or x1 <= x0:
        return None
    def cut(origin):
        return slice(y0 - origin[0], y1 - origin[0]), slice(x0 - origin[1], x1 - origin[1])
    return cut(origin_a), cut(origin_b)
