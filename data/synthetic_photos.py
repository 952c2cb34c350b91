"""Drawing one image of a synthetic dataset with REAL pixels (make-synthetic --pixels photos):
objects cut from the photographs scikit-image ships in its wheel (skimage/data: nothing is
downloaded), composited with exact amodal boxes onto backgrounds cut from its texture photographs.

A class is one source photograph (the cat, the coffee cup, the rocket, ...; twelve in all); an
object of it is a window of that photograph (40-100% of each side, anywhere in it, sometimes
mirrored, with brightness and contrast jitter) resampled to the drawn box and cut with a soft
mask (a rounded rectangle or an ellipse, sharp to very blurred), except the horse and the logo,
which keep their own silhouettes, and faces, which are the 200 faces of the Labeled Faces in the
Wild subset it ships. The box is the whole window: exact, whatever the blur hides. Backgrounds are
brick, grass, gravel, page or tissue photographs with a colour cast; clutter is patches of
photographs that are no class. Every image comes from one Generator seeded by (seed, split, index),
as the shapes do (data/synthetic_render.py), so reruns are bit-identical."""

from __future__ import annotations

import importlib.util
import math
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import UserError
from data.synthetic_render import MIN_VISIBLE, OBJECTS, SPLITS, sample_size
from data.synthetic_shapes import composite, gaussian_blur, overlap

# class name -> photograph in skimage/data ("faces": the LFW subset, one face per object)
PHOTO_CLASSES = {"cat": "chelsea.png", "coffee": "coffee.png", "rocket": "rocket.jpg",
                 "motorcycle": "motorcycle_left.png", "astronaut": "astronaut.png", "cameraman": "camera.png",
                 "coins": "coins.png", "moon": "moon.png", "galaxies": "hubble_deep_field.jpg", "retina": "retina.jpg",
                 "horse": "horse.png", "faces": "lfw_subset.npy"}
BACKGROUNDS = ("brick.png", "grass.png", "gravel.png", "page.png", "ihc.png", "cell.png")
CLUTTER = ("color.png", "phantom.png", "clock_motion.png", "text.png", "microaneurysms.png", "logo.png")
SILHOUETTES = {"horse.png": 128.0, "logo.png": 235.0}  # figures on white: cut below this brightness


def photo_folder() -> Path:
    """skimage/data, found without importing scikit-image (only its files are read)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--objects photos cuts objects from the photographs scikit-image ships; install it: "
                        "pip install 'ldcache[photos]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f for f in (*PHOTO_CLASSES.values(), *BACKGROUNDS, *CLUTTER) if not (folder / f).is_file()]
    if missing:
        raise UserError(f"scikit-image at {folder} lacks {missing}; install scikit-image >= 0.22")
    return folder


@cache
def photo(name: str) -> np.ndarray:
    """A photograph as float32 RGBA [H, W, 4] in 0..255 (alpha 255 where it has none); the LFW
    faces as [200, 25, 25, 4]."""
    path = photo_folder() / name
    if name.endswith(".npy"):
        faces = np.load(path).astype(np.float32) * 255.0  # [200, 25, 25] grey
        return np.concatenate([np.repeat(faces[..., None], 3, axis=-1), np.full((*faces.shape, 1), 255.0,
                                                                                 np.float32)], axis=-1)
    return np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32)


def render_photo_image(seed: int, split: str, index: int, image_size: int, num_classes: int,
                       objects: dict | None = None) -> tuple[np.ndarray, list[dict]]:
    """One image [H, W, 3] uint8 and its annotations (category_id, bbox, area, iscrowd, visible)."""
    objects = {**OBJECTS, **(objects or {})}
    rng = np.random.default_rng([seed, SPLITS[split], index, 7])
    width, height = (int(rng.integers(round(0.6 * image_size), image_size + 1)) for _ in range(2))
    canvas = _background(rng, height, width)
    shown: list = []  # [annotation, alpha still seen, ox, oy, alpha sum unoccluded]
    for _ in range(int(rng.integers(0, 4))):
        _paint_window(rng, canvas, CLUTTER[int(rng.integers(len(CLUTTER)))], shown, annotate=None)
    count = int(rng.integers(objects["min_objects"], objects["max_objects"] + 1))
    sizes = [sample_size(rng, width, height, objects["min_object_px"], objects["max_object_frac"])
             for _ in range(count)]
    names = list(PHOTO_CLASSES)[:num_classes]
    for w, h in sorted(sizes, key=lambda wh: -wh[0] * wh[1]):  # large first: small ones lie on them
        k = int(rng.integers(num_classes))
        _paint_window(rng, canvas, PHOTO_CLASSES[names[k]], shown, annotate=k, size=(w, h))
    canvas += rng.normal(0.0, rng.uniform(1.0, 4.0), size=canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, [{**ann, "visible": round(float(seen.sum()) / total, 3)} for ann, seen, _, _, total in shown]


def _background(rng, height: int, width: int) -> np.ndarray:
    """A texture photograph cut and resampled to the canvas, with a colour cast and a brightness ramp."""
    source = photo(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])[..., :3]
    window = _resample(_window(rng, source, 0.3, 1.0), width, height)
    cast = rng.uniform(0.6, 1.2, size=3).astype(np.float32)
    ramp = rng.uniform(-30, 30) * (np.arange(width, dtype=np.float32)[None, :] / width - 0.5)
    return np.clip(window * cast + ramp[..., None], 0, 255).astype(np.float32)


def _window(rng, source: np.ndarray, low: float, high: float, aspect: float | None = None) -> np.ndarray:
    """A random window of the photograph, anywhere in it: low..high of each side, or (aspect =
    width / height) the largest window of that shape scaled by low..high, so it is never stretched."""
    h, w = source.shape[:2]
    if aspect is None:
        wh, ww = (max(2, int(round(side * rng.uniform(low, high)))) for side in (h, w))
    else:
        fit = min(h, w / aspect) * rng.uniform(low, high)
        wh, ww = max(2, min(h, int(round(fit)))), max(2, min(w, int(round(fit * aspect))))
    y, x = int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1))
    return source[y:y + wh, x:x + ww]


def _resample(window: np.ndarray, width: int, height: int) -> np.ndarray:
    channels = [np.asarray(Image.fromarray(window[..., c]).resize((width, height), Image.BILINEAR, reducing_gap=2.0))
                for c in range(window.shape[-1])]
    return np.stack(channels, axis=-1).astype(np.float32)


def _paint_window(rng, canvas, name: str, shown: list, annotate: int | None, size=None) -> None:
    """Paint a window of photograph `name` (a class when annotate is its index, else clutter) in a
    box somewhere it hides no annotated thing too much; annotate the box, or drop it after ten tries."""
    height, width = canvas.shape[:2]
    source = photo(name)
    if size is None:  # clutter: a patch of up to a third of the short side
        side = float(rng.uniform(10.0, max(11.0, min(width, height) / 3)))
        size = (side * rng.uniform(0.6, 1.6), side)
    area, aspect = size[0] * size[1], min(2.0, max(0.5, size[0] / size[1]))  # photographs: at most 2:1
    if name.endswith(".npy"):  # a face: one of the 200, whole
        pixels = source[int(rng.integers(len(source)))]
    elif name in SILHOUETTES:
        pixels = _silhouette(name)
    else:
        pixels = _window(rng, source, 0.4, 1.0, aspect)
    if name.endswith(".npy") or name in SILHOUETTES:  # their own shape, give or take 15%
        aspect = pixels.shape[1] / pixels.shape[0] * rng.uniform(0.85, 1.15)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    w, h = max(4, int(round(math.sqrt(area * aspect)))), max(4, int(round(math.sqrt(area / aspect))))
    w, h = min(w, width - 2), min(h, height - 2)
    patch = _resample(np.ascontiguousarray(pixels), w, h)
    colour = patch[..., :3] * rng.uniform(0.75, 1.25) + rng.uniform(-25, 25)  # brightness and contrast
    alpha = patch[..., 3] / 255.0
    if not name.endswith(".npy") and name not in SILHOUETTES:
        alpha = alpha * _soft_mask(rng, h, w)
    mode = rng.random()  # sharp / soft / very soft edges, capped so small objects stay visible
    sigma = 0.0 if mode < 0.4 else rng.uniform(0.5, 1.5) if mode < 0.75 else rng.uniform(1.5, 3.0)
    sigma = float(min(sigma, 0.2 * min(w, h)))
    margin = int(math.ceil(3 * sigma))
    alpha = gaussian_blur(np.pad(alpha, margin), sigma).astype(np.float32)
    colour = np.pad(colour, ((margin, margin), (margin, margin), (0, 0)), mode="edge")
    for _ in range(10):
        x, y = int(rng.integers(1, width - w)), int(rng.integers(1, height - h))
        if not _hides_too_much(shown, alpha, x - margin, y - margin):
            break
    else:
        return
    composite(canvas, alpha, x - margin, y - margin, np.clip(colour, 0, 255))
    for _, seen, sx, sy, _ in shown:
        both = overlap((sy, sx), seen.shape, (y - margin, x - margin), alpha.shape)
        if both is not None:
            seen[both[0]] *= 1.0 - alpha[both[1]]
    if annotate is not None:
        ann = {"category_id": annotate + 1, "bbox": [float(x), float(y), float(w), float(h)],
               "area": round(float(alpha.sum()), 2), "iscrowd": 0, "blur": round(sigma, 3)}
        shown.append([ann, alpha.copy(), x - margin, y - margin, float(alpha.sum())])


@cache
def _silhouette(name: str) -> np.ndarray:
    """A photograph of a figure on white (the horse, the logo) with its figure as alpha, cut to the
    figure's extent so the silhouette touches all four sides of the box."""
    source = photo(name).copy()
    figure = source[..., :3].mean(axis=-1) < SILHOUETTES[name]
    source[..., 3] = 255.0 * figure
    rows, cols = np.nonzero(figure)
    return source[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _soft_mask(rng, h: int, w: int) -> np.ndarray:
    """A rounded rectangle or an ellipse filling the h x w box (so the box stays its extent)."""
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    power = 2.0 if rng.random() < 0.4 else float(rng.uniform(3.0, 8.0))  # ellipse, or a squarer superellipse
    inside = np.abs(xs[None, :]) ** power + np.abs(ys[:, None]) ** power
    return (inside <= 1.0).astype(np.float32)


def _hides_too_much(shown: list, alpha, ox: int, oy: int) -> bool:
    for _, seen, sx, sy, total in shown:
        both = overlap((sy, sx), seen.shape, (oy, ox), alpha.shape)
        if both is not None and float(seen.sum()) - float((seen[both[0]] * alpha[both[1]]).sum()) < MIN_VISIBLE * total:
            return True
    return False
