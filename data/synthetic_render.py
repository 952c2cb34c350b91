"""Drawing one image of the synthetic dataset (data/synthetic.py): shapes with exact amodal
boxes on textured backgrounds, with blur, low contrast, occlusion, clutter and crowd regions, all
from one Generator seeded by (seed, split, index)."""

from __future__ import annotations

import math

import numpy as np

from data.synthetic_shapes import (
    SHAPES,
    blob_inside,
    composite,
    gaussian_blur,
    make_background,
    object_colour,
    overlap,
    random_colour,
    rasterise,
    sample_shape_params,
    segment_coverage,
    shape_alpha,
    shape_inside,
)

SPLITS = {"train": 0, "val": 1}  # the split's code is part of every image's seed
MIN_SIDE = 6.0  # px; a thinner object would be little more than its own blurred edges
LOW_CONTRAST_PROB = 0.15
MIN_VISIBLE = 0.5  # later paint may hide at most half of an annotated object
# Objects per image and their sizes; other datasets of the project (benchmarks/ld_defaults.py) vary them.
OBJECTS = {"min_objects": 1, "max_objects": 8, "min_object_px": 12.0, "max_object_frac": 0.7, "pixels": "shapes"}


def render_image(seed: int, split: str, index: int, image_size: int, num_classes: int,
                 crowd_prob: float, objects: dict | None = None) -> tuple[np.ndarray, list[dict]]:
    """One image [H, W, 3] uint8 and its annotations (category_id, bbox, area, iscrowd, ...).
    objects: OBJECTS overrides (how many objects an image gets, and their sizes)."""
    objects = {**OBJECTS, **(objects or {})}
    rng = np.random.default_rng([seed, SPLITS[split], index])
    # Sizes vary per image so batching and padding downstream get exercised.
    width, height = (int(rng.integers(round(0.6 * image_size), image_size + 1)) for _ in range(2))
    canvas = make_background(rng, height, width)
    # Per annotated thing: [annotation, its alpha as still seen, ox, oy, alpha sum unoccluded].
    shown = []
    for _ in range(int(rng.integers(0, 7))):
        _paint_clutter(rng, canvas, shown)  # under everything, so it hides nothing
    if rng.random() < crowd_prob:
        _paint_crowd(rng, canvas, num_classes, shown)
    # Largest first, so that small objects often lie on big ones rather than vanish under them.
    count = int(rng.integers(objects["min_objects"], objects["max_objects"] + 1))
    sizes = [sample_size(rng, width, height, objects["min_object_px"], objects["max_object_frac"])
             for _ in range(count)]
    for w, h in sorted(sizes, key=lambda wh: -wh[0] * wh[1]):
        _paint_object(rng, canvas, w, h, int(rng.integers(num_classes)), shown)
    for _ in range(int(rng.integers(0, 3))):
        _paint_clutter(rng, canvas, shown)  # on top: occludes objects, within MIN_VISIBLE

    canvas += rng.normal(0.0, rng.uniform(1.0, 4.0), size=canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    anns = [{**ann, "visible": round(float(seen.sum()) / total, 3)}
            for ann, seen, _, _, total in shown]
    return image, anns


def sample_size(rng, width: int, height: int, min_px: float = 12.0, max_frac: float = 0.7) -> tuple[float, float]:
    """Box (w, h): sqrt(area) log-uniform from min_px to max_frac of the short side, w/h in [1/4, 4]."""
    side = math.exp(rng.uniform(math.log(min_px), math.log(max(max_frac * min(width, height), min_px * 1.01))))
    ratio = math.exp(rng.uniform(math.log(0.25), math.log(4.0)))
    w, h = side * math.sqrt(ratio), side / math.sqrt(ratio)
    grow = max(1.0, MIN_SIDE / min(w, h))
    shrink = min(1.0, (width - 2.5) / (w * grow), (height - 2.5) / (h * grow))  # 1 px border
    return w * grow * shrink, h * grow * shrink


def _paint_object(rng, canvas, w: float, h: float, class_index: int, shown: list) -> None:
    """Paint one class shape in a w x h box somewhere it hides no annotated thing too much;
    append it to `shown`, or drop it when ten placements fail."""
    height, width = canvas.shape[:2]
    name = SHAPES[class_index]
    inside = shape_inside(name, sample_shape_params(name, rng))
    mode = rng.random()  # sharp / soft / very soft, capped so small objects stay visible
    sigma = 0.0 if mode < 0.4 else rng.uniform(0.5, 1.5) if mode < 0.75 else rng.uniform(1.5, 4.0)
    sigma = float(min(sigma, 0.25 * min(w, h)))
    for _ in range(10):
        box = [float(rng.uniform(1.0, width - 1.0 - w)), float(rng.uniform(1.0, height - 1.0 - h)),
               w, h]
        alpha, ox, oy, area = shape_alpha(inside, box, sigma)
        if not _hides_too_much(shown, alpha, ox, oy):
            break
    else:
        return
    x0, y0, x1, y1 = int(box[0]), int(box[1]), int(box[0] + w) + 1, int(box[1] + h) + 1
    background = canvas[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
    colour = object_colour(rng, background, LOW_CONTRAST_PROB)
    # A gentle brightness ramp across the object, so its fill is not one flat colour either.
    ys = (oy + np.arange(alpha.shape[0], dtype=np.float32) - box[1]) / h - 0.5
    xs = (ox + np.arange(alpha.shape[1], dtype=np.float32) - box[0]) / w - 0.5
    ramp = rng.uniform(-25.0, 25.0) * xs[None, :] + rng.uniform(-25.0, 25.0) * ys[:, None]
    _paint(canvas, shown, alpha, ox, oy, colour + ramp[..., None])
    ann = {"category_id": class_index + 1, "bbox": [round(v, 3) for v in box],
           "area": round(area, 2), "iscrowd": 0, "blur": round(sigma, 3),
           "contrast": round(float(np.linalg.norm(colour - background)) / 255.0, 3)}
    shown.append([ann, alpha.copy(), ox, oy, float(alpha.sum())])


def _paint_crowd(rng, canvas, num_classes: int, shown: list) -> None:
    """A cluster of 6-14 tiny same-class shapes, annotated as one iscrowd=1 region (COCO style)."""
    height, width = canvas.shape[:2]
    hi = 0.45 * min(width, height)  # under 24 px only for the smallest images
    cw, ch = (float(rng.uniform(min(24.0, hi), hi)) for _ in range(2))
    cx, cy = float(rng.uniform(1.0, width - 1.0 - cw)), float(rng.uniform(1.0, height - 1.0 - ch))
    class_index = int(rng.integers(num_classes))
    base = random_colour(rng)
    x0, y0 = math.floor(cx), math.floor(cy)
    union = np.zeros((math.ceil(ch) + 2, math.ceil(cw) + 2), np.float32)  # amodal coverage
    boxes = []
    for _ in range(int(rng.integers(6, 15))):
        w, h = float(rng.uniform(5.0, 10.0)), float(rng.uniform(5.0, 10.0))
        box = [float(rng.uniform(cx, cx + cw - w)), float(rng.uniform(cy, cy + ch - h)), w, h]
        inside = shape_inside(SHAPES[class_index], sample_shape_params(SHAPES[class_index], rng))
        cover = rasterise(inside, box, x0, y0, union.shape[1], union.shape[0], supersample=4)
        np.maximum(union, cover, out=union)
        composite(canvas, cover, x0, y0, np.clip(base + rng.normal(0.0, 12.0, size=3), 0, 255))
        boxes.append(box)
    bx0, by0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    bx1, by1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    ann = {"category_id": class_index + 1,
           "bbox": [round(bx0, 3), round(by0, 3), round(bx1 - bx0, 3), round(by1 - by0, 3)],
           "area": round(float(union.sum()), 2), "iscrowd": 1, "blur": 0.0,
           "contrast": 0.0}  # contrast is not defined for a region of many objects
    shown.append([ann, union.copy(), x0, y0, float(union.sum())])


def _paint_clutter(rng, canvas, shown: list) -> None:
    """A distractor of no class: a line, a scatter of specks or a partial blob (skipped if it
    would hide an annotated thing too much)."""
    height, width = canvas.shape[:2]
    kind = rng.random()
    sigma = float(rng.uniform(0.0, 1.5))
    colour = random_colour(rng)
    if kind < 0.4:
        (xa, ya), (xb, yb) = rng.uniform(0.0, 1.0, size=(2, 2)) * (width, height)
        margin = math.ceil(3.0 * sigma) + 3
        ox, oy = math.floor(min(xa, xb)) - margin, math.floor(min(ya, yb)) - margin
        w, h = math.ceil(abs(xb - xa)) + 2 * margin + 1, math.ceil(abs(yb - ya)) + 2 * margin + 1
        alpha = segment_coverage((xa, ya), (xb, yb), rng.uniform(0.8, 3.0), ox, oy, w, h)
        alpha = gaussian_blur(alpha, sigma)
    elif kind < 0.7:
        cx, cy = float(rng.uniform(0.0, width)), float(rng.uniform(0.0, height))
        ox, oy = math.floor(cx) - 32, math.floor(cy) - 32
        alpha = np.zeros((64, 64), np.float32)
        for _ in range(int(rng.integers(3, 16))):
            p = tuple(np.clip(rng.normal((cx, cy), 10.0), (ox + 3, oy + 3), (ox + 60, oy + 60)))
            speck = segment_coverage(p, p, rng.uniform(1.0, 4.0), ox, oy, 64, 64)
            np.maximum(alpha, speck, out=alpha)
    else:
        side = float(rng.uniform(8.0, 0.3 * min(width, height)))
        box = [float(rng.uniform(-side / 2, width - side / 2)),
               float(rng.uniform(-side / 2, height - side / 2)), side, side]
        alpha, ox, oy, _ = shape_alpha(blob_inside(rng), box, sigma)
    alpha = alpha * np.float32(rng.uniform(0.6, 1.0))  # some clutter is translucent
    if not _hides_too_much(shown, alpha, ox, oy):
        _paint(canvas, shown, alpha, ox, oy, colour)


def _hides_too_much(shown: list, alpha, ox: int, oy: int) -> bool:
    """Whether alpha painted at (ox, oy) would leave an annotated thing under MIN_VISIBLE seen."""
    for _, seen, sx, sy, total in shown:
        both = overlap((sy, sx), seen.shape, (oy, ox), alpha.shape)
        if both is not None:
            hidden = float((seen[both[0]] * alpha[both[1]]).sum())
            if float(seen.sum()) - hidden < MIN_VISIBLE * total:
                return True
    return False


def _paint(canvas, shown: list, alpha, ox: int, oy: int, fill) -> None:
    """Composite a layer and take its share of what is still seen of each annotated thing."""
    composite(canvas, alpha, ox, oy, fill)
    for _, seen, sx, sy, _ in shown:
        both = overlap((sy, sx), seen.shape, (oy, ox), alpha.shape)
        if both is not None:
            seen[both[0]] *= 1.0 - alpha[both[1]]
