"""A seeded COCO-format detection dataset of shapes that needs no download.

make_synthetic(out) writes OUT/{train,val}/*.png and OUT/annotations/instances_{train,val}.json.
Classes differ by shape (synthetic_shapes.SHAPES); colour is drawn independently of class. Boxes
are the exact amodal extent of each shape. Edges are made ambiguous on purpose, because that is
what Localization Distillation transfers: per-object blur from sharp to very soft, occlusion,
low-contrast objects, clutter and textured backgrounds. Each annotation carries extra keys
"blur" (Gaussian sigma, px), "contrast" (RGB distance to the local background / 255) and
"visible" (fraction of the shape's coverage left unoccluded).

Every image is drawn from its own Generator seeded by (seed, split, index): train and val are
independent, images can be rendered in any order or process, and reruns are bit-identical.
Images are PNG: lossless, so every reader decodes exactly the rendered pixels and the soft edges
are ours alone, not JPEG block artefacts (cost: ~80 KB an image, ~100 MB for the default).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.config import check, param, validate_fields
from core.domains import MAX_SEED, OneOf, Range
from core.errors import UserError
from data.synthetic_photos import PHOTO_CLASSES, photo_folder, render_photo_image
from data.synthetic_render import OBJECTS, SPLITS, render_image
from data.synthetic_shapes import SHAPES

GENERATOR_VERSION = 1  # bump when any change alters pixels or annotations
# ~1200 images of <=256 px render in seconds and train a small GFL on 2 CPU cores in minutes;
# 6 classes keep the first, most distinct shapes.
DEFAULT_SYNTHETIC = dict(num_train=1000, num_val=200, image_size=256, seed=0, num_classes=6,
                         crowd_prob=0.02)
SYNTHETIC_IMG_SCALE = (256, 256)  # the default images' own size: no pointless upscaling to 1333x800


@dataclass(frozen=True)
class SyntheticConfig:
    """What `ldcache make-synthetic` writes; validated at construction (make_synthetic builds one)."""

    num_train: int = param(1000, "training images", Range(1, 10_000_000))
    num_val: int = param(200, "validation images", Range(1, 10_000_000))
    image_size: int = param(256, "upper bound of an image's long side, px", Range(64, 4096))
    num_classes: int = param(6, f"object classes (at most {len(SHAPES)} shapes or {len(PHOTO_CLASSES)} photographs)",
                             Range(1, max(len(SHAPES), len(PHOTO_CLASSES))))
    seed: int = param(0, "random seed; same seed, same dataset", Range(0, MAX_SEED))
    crowd_prob: float = param(0.02, "probability of a crowd region on an image", Range(0, 1, integer=False))
    min_objects: int = param(1, "fewest objects an image gets", Range(1, 200))
    max_objects: int = param(8, "most objects an image gets (>= --min-objects)", Range(1, 200))
    min_object_px: float = param(12.0, "smallest object side, px (sqrt of its box area; log-uniform up to the "
                                       "largest)", Range(4, 4096, integer=False))
    max_object_frac: float = param(0.7, "largest object side as a fraction of the image's short side",
                                   Range(0, 0.95, integer=False, low_open=True))
    pixels: str = param("shapes", "what objects are made of: shapes (drawn by our code) or photos (real pixels: "
                                  "cut from the photographs scikit-image ships; pip install 'ldcache[photos]')",
                        OneOf("shapes", "photos"))

    def __post_init__(self):
        validate_fields(self, "synthetic dataset")
        problems = []
        if self.min_objects > self.max_objects:
            problems.append(f"min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})")
        if self.pixels == "shapes" and self.num_classes > len(SHAPES):
            problems.append(f"num_classes must be at most {len(SHAPES)} with --pixels shapes (up to "
                            f"{len(PHOTO_CLASSES)} with --pixels photos), got {self.num_classes}")
        check(problems, "synthetic dataset")


def make_synthetic(out_dir, num_train: int = 1000, num_val: int = 200, image_size: int = 256,
                   seed: int = 0, num_classes: int = 6, crowd_prob: float = 0.02,
                   overwrite: bool = False, workers: int = 1, **objects) -> Path:
    """Write the dataset into out_dir atomically and return it; `workers` never changes output.
    objects: min_objects, max_objects, min_object_px, max_object_frac (SyntheticConfig)."""
    params = _validated(num_train, num_val, image_size, seed, num_classes, crowd_prob, objects)
    if params.get("pixels") == "photos":
        photo_folder()  # scikit-image installed? (a one-line error before anything is written)
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers must be an integer >= 1, got {workers!r}")
    out = Path(out_dir).expanduser()
    if _non_empty(out) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another folder or allow overwrite")
    tmp = generate_beside(out, params, workers)
    if overwrite and _non_empty(out):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    elif not _rename_or_discard(tmp, out):
        raise UserError(f"{out} was created by another process meanwhile; choose another folder")
    return out


def synthetic_split(split: str) -> tuple[Path, Path]:
    """(image folder, annotation json) of a split of the default dataset, generated on first use."""
    root = ensure_synthetic_default()
    return root / split, root / "annotations" / f"instances_{split}.json"


def synthetic_default_path(root: Path | None = None) -> Path:
    """Where the default dataset lives (or will): root/synthetic-v1, root defaulting to
    $LDCACHE_HOME, else ~/.cache/ldcache. Nothing is generated."""
    if root is None:
        root = os.environ.get("LDCACHE_HOME") or Path.home() / ".cache" / "ldcache"
    return Path(root).expanduser() / f"synthetic-v{GENERATOR_VERSION}"


def ensure_synthetic_default(root: Path | None = None) -> Path:
    """The default dataset's folder (synthetic_default_path), generated on first use; concurrent
    callers all get the winner's copy."""
    out = synthetic_default_path(root)
    if not is_dataset(out):
        if _non_empty(out):
            raise UserError(f"{out} is not a complete synthetic dataset; delete it to regenerate")
        params = _validated(**DEFAULT_SYNTHETIC)
        tmp = generate_beside(out, params, workers=min(2, os.cpu_count() or 1))
        # Losing a race is fine: the winner wrote the same data.
        if not _rename_or_discard(tmp, out) and not is_dataset(out):
            raise UserError(f"could not move the synthetic dataset into {out}; delete that path")
    info = json.loads((out / "annotations" / "instances_val.json").read_text())["info"]
    if info.get("params") != DEFAULT_SYNTHETIC:
        raise UserError(f"{out} holds other parameters than the default; delete it to regenerate")
    return out


def _validated(num_train, num_val, image_size, seed, num_classes, crowd_prob, objects: dict | None = None) -> dict:
    """The generation parameters as recorded in the JSON, or a UserError naming the bad one."""
    objects = {**OBJECTS, **(objects or {})}
    unknown = sorted(set(objects) - set(OBJECTS))
    if unknown:
        raise UserError(f"unknown synthetic options {unknown}; expected some of {sorted(OBJECTS)}")
    as_python = {k: _plain(v) for k, v in objects.items()}
    cfg = SyntheticConfig(num_train=_plain(num_train), num_val=_plain(num_val), image_size=_plain(image_size),
                          seed=_plain(seed), num_classes=_plain(num_classes), crowd_prob=_plain(crowd_prob),
                          **as_python)
    params = {k: getattr(cfg, k) for k in DEFAULT_SYNTHETIC}
    # Object options are recorded only when they differ from the defaults, so datasets made before
    # they existed keep their parameters (and the default dataset stays the default).
    params.update({k: getattr(cfg, k) for k in OBJECTS if getattr(cfg, k) != OBJECTS[k]})
    return params


def _plain(value):
    """A numpy scalar as the Python number it holds (what callers from numpy code pass)."""
    return value.item() if isinstance(value, np.generic) else value


def generate_beside(out: Path, params: dict, workers: int) -> Path:
    """Render the whole dataset into a fresh hidden sibling of `out` and return that folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
        (tmp / "annotations").mkdir()
        # Workers only change who renders an image, never what it is (each has its own seed).
        with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
            for split in SPLITS:
                (tmp / split).mkdir()
                tasks = [(tmp / split, split, i, params) for i in range(params[f"num_{split}"])]
                results = pool.map(render_to_file, tasks, chunksize=16) if pool else map(
                    render_to_file, tasks)
                coco = _coco_json(split, params, list(results))
                (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def render_to_file(task) -> tuple[int, int, list[dict]]:
    folder, split, index, params = task
    objects = {k: params[k] for k in OBJECTS if k in params}
    if params.get("pixels") == "photos":
        image, anns = render_photo_image(params["seed"], split, index, params["image_size"], params["num_classes"],
                                         objects)
    else:
        image, anns = render_image(params["seed"], split, index, params["image_size"], params["num_classes"],
                                   params["crowd_prob"], objects)
    # compress_level 1: under half the time of the default 6, files ~13% larger (noise dominates)
    Image.fromarray(image).save(folder / f"{index + 1:06d}.png", compress_level=1)
    return image.shape[1], image.shape[0], anns


def _coco_json(split: str, params: dict, results: list) -> dict:
    """COCO instances dict; image ids are 1..N in index order, annotation ids 1..M."""
    images, annotations = [], []
    for index, (width, height, anns) in enumerate(results):
        images.append({"id": index + 1, "file_name": f"{index + 1:06d}.png", "width": width,
                       "height": height})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann})
    photos = params.get("pixels") == "photos"
    names = list(PHOTO_CLASSES) if photos else SHAPES
    categories = [{"id": k + 1, "name": names[k], "supercategory": "photo" if photos else "shape"}
                  for k in range(params["num_classes"])]
    # "detector.synthetic": where the generator lived when GENERATOR_VERSION 1 was set; kept, so a
    # dataset generated now is byte for byte the one existing caches were dumped from.
    info = {"description": "ldcache synthetic shapes", "generator": "detector.synthetic",
            "version": GENERATOR_VERSION, "split": split, "seed": params["seed"],
            "params": params}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}


def _non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def is_dataset(path: Path) -> bool:
    return all((path / "annotations" / f"instances_{s}.json").is_file() for s in SPLITS)


def _rename_or_discard(tmp: Path, out: Path) -> bool:
    """Move tmp to out (atomic; replaces only an empty folder); on a lost race delete tmp."""
    try:
        os.rename(tmp, out)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
