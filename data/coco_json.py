"""COCO annotation json read the way mmdetection reads it, into vectorised tables.

mmdetection's rules, kept on purpose because results must be comparable:
- labels are indices into the sorted category ids;
- an annotation is used iff it is not crowd, not 'ignore', overlaps the image with positive area,
  has area > 0 and w >= 1 and h >= 1; its box is (x, y, x + w, y + h) in float32.
Every malformed entry is a UserError naming the file and the entry.
"""

from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO

from core.errors import UserError, first_line


def load_coco(ann_file: str | Path) -> COCO:
    """Path of a COCO json -> pycocotools COCO (its prints silenced); UserError if it is not one."""
    path = Path(ann_file)
    if not path.is_file():
        raise UserError(
            f"annotation file {path} does not exist or is not a file; pass the path of a COCO json"
        )
    # json builds millions of containers and the cyclic GC would rescan them again and again: off,
    # loading train2017-sized files takes half the time. Nothing here creates reference cycles.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; pycocotools asserts a dict at the top
    # and raises KeyError / TypeError while indexing entries that lack 'id' or 'image_id'.
    except (OSError, ValueError, AssertionError, KeyError, TypeError) as error:
        raise UserError(
            f"annotation file {path} is not valid COCO json ({type(error).__name__}): "
            f"{first_line(error)}; fix or regenerate the file"
        ) from error
    finally:
        if gc_was_enabled:
            gc.enable()
    dataset = coco.dataset
    missing = [key for key in ("images", "categories") if not isinstance(dataset.get(key), list)]
    if missing or not isinstance(dataset.get("annotations", []), list):
        what = f"no list {missing}" if missing else "an 'annotations' entry that is not a list"
        raise UserError(
            f"annotation file {path} is not valid COCO json: it has {what}; "
            "fix or regenerate the file"
        )
    return coco


def categories_in_label_order(
    categories: Sequence[dict], ann_file: str | Path = ""
) -> tuple[list[int], list[str]]:
    """COCO 'categories' -> (category id per label, class name per label).

    Labels follow the sorted category ids, which for COCO is mmdetection's class order.
    """
    try:
        names_by_id = {}
        for category in categories:
            cat_id = int(category["id"])
            if cat_id in names_by_id:
                raise UserError(
                    f"annotation file {ann_file} lists category id {cat_id} twice; "
                    "keep one entry per id"
                )
            names_by_id[cat_id] = str(category.get("name", cat_id))
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(
            f"annotation file {ann_file} has a category without an integer 'id' "
            f"({first_line(error)}); fix its 'categories'"
        ) from error
    if not names_by_id:
        raise UserError(f"annotation file {ann_file} has no categories; add its 'categories' list")
    cat_ids = sorted(names_by_id)
    return cat_ids, [names_by_id[c] for c in cat_ids]


def labels_to_cat_ids(
    labels: torch.Tensor | np.ndarray | Sequence[int], label_to_cat_id: Sequence[int]
) -> list[int]:
    """Contiguous labels -> COCO category ids (the inverse of the dataset's mapping)."""
    table = np.asarray(label_to_cat_id, dtype=np.int64)
    return table[np.asarray(labels, dtype=np.int64)].tolist()


def image_table(images: list[dict], ann_file: Path):
    """'images' -> (ids, file names, heights, widths), sorted by id."""
    try:
        ids = np.array([im["id"] for im in images], dtype=np.int64)
        heights = np.array([im["height"] for im in images], dtype=np.int64)
        widths = np.array([im["width"] for im in images], dtype=np.int64)
        file_names = [str(im["file_name"]) for im in images]
    except (KeyError, TypeError, ValueError) as error:
        keys = ("id", "file_name", "width", "height")
        bad = [im for im in images if not isinstance(im, dict) or not all(k in im for k in keys)]
        where = f"image entry {bad[0]!r:.80}" if bad else "an image entry"
        raise UserError(
            f"annotation file {ann_file}: {where} lacks an integer id/width/height or a file_name "
            f"({first_line(error)}); fix its 'images'"
        ) from error
    unique_ids, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise UserError(
            f"annotation file {ann_file} lists image id {unique_ids[counts > 1][0]} twice; "
            "keep one entry per id"
        )
    bad_size = np.nonzero((heights < 1) | (widths < 1))[0]
    if len(bad_size):
        k = bad_size[0]
        raise UserError(
            f"annotation file {ann_file}: image {ids[k]} has size {widths[k]}x{heights[k]}; "
            "fix its width/height"
        )
    order = np.argsort(ids, kind="stable")
    return ids[order], [file_names[k] for k in order], heights[order], widths[order]


def annotation_columns(annotations: list[dict], ann_file: Path):
    """'annotations' -> column arrays. The fast path is one comprehension per field."""
    try:
        ann_ids = np.array([a["id"] for a in annotations], dtype=np.int64)
        image_ids = np.array([a["image_id"] for a in annotations], dtype=np.int64)
        cat_ids = np.array([a["category_id"] for a in annotations], dtype=np.int64)
        bbox = np.array([a["bbox"] for a in annotations], dtype=np.float64)
        bbox = bbox.reshape(len(annotations), 4)  # [A, 4] xywh
        area = np.array([a.get("area", np.nan) for a in annotations], dtype=np.float64)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)
        ignore = np.array([bool(a.get("ignore", False)) for a in annotations], dtype=bool)
    except (KeyError, TypeError, ValueError) as error:
        # Slow path, only to name the offending annotation in the message.
        for a in annotations:
            keys = ("id", "image_id", "category_id", "bbox")
            ok_keys = isinstance(a, dict) and all(k in a for k in keys)
            if not ok_keys or not isinstance(a["bbox"], (list, tuple)) or len(a["bbox"]) != 4:
                name = a.get("id", "?") if isinstance(a, dict) else "?"
                raise UserError(
                    f"annotation {name} in {ann_file} needs id, image_id, category_id and a "
                    "4-number bbox; fix the annotation file"
                ) from error
        raise UserError(
            f"annotation file {ann_file} has a malformed annotation ({first_line(error)}); fix it"
        ) from error
    # Annotations written without 'area' (some converters omit it) fall back to the box area.
    area = np.where(np.isnan(area), bbox[:, 2] * bbox[:, 3], area)
    return ann_ids, image_ids, cat_ids, bbox, area, crowd, ignore


def box_table(annotations, img_ids, heights, widths, cat_ids, ann_file: Path):
    """Annotations -> usable boxes grouped by image, with mmdet's rules (see the module docstring).

    img_ids, heights, widths: [I] sorted by id. Returns boxes_xyxy [M, 4] float32 in original
    pixels, labels [M] int64, offsets [I + 1] (image i owns rows offsets[i]:offsets[i + 1], in
    annotation order) and has_annotation [I] (any annotation at all, for mmdet's empty filter).
    """
    columns = annotation_columns(annotations, ann_file)
    ann_ids, ann_img_ids, ann_cat_ids, bbox, area, crowd, ignore = columns
    cat_table = np.asarray(cat_ids, dtype=np.int64)
    labels = np.searchsorted(cat_table, ann_cat_ids).clip(max=len(cat_table) - 1)
    unknown = np.nonzero(cat_table[labels] != ann_cat_ids)[0]
    if len(unknown):
        k = unknown[0]
        raise UserError(
            f"annotation {ann_ids[k]} in {ann_file} has category_id {ann_cat_ids[k]}, "
            "which is not in 'categories'; fix the annotation or add the category"
        )
    # Annotations of images missing from 'images' are never seen by mmdet either: skip them.
    pos = np.searchsorted(img_ids, ann_img_ids).clip(max=len(img_ids) - 1)
    known = img_ids[pos] == ann_img_ids
    x1, y1, w, h = bbox.T
    inter_w = np.maximum(0.0, np.minimum(x1 + w, widths[pos]) - np.maximum(x1, 0.0))
    inter_h = np.maximum(0.0, np.minimum(y1 + h, heights[pos]) - np.maximum(y1, 0.0))
    usable = known & ~crowd & ~ignore & (inter_w * inter_h > 0)
    usable &= (area > 0) & (w >= 1) & (h >= 1)

    order = np.nonzero(usable)[0]
    order = order[np.argsort(pos[order], kind="stable")]  # by image, annotation order within one
    boxes_xyxy = np.stack([x1, y1, x1 + w, y1 + h], axis=1)[order].astype(np.float32)  # [M, 4]
    counts = np.bincount(pos[order], minlength=len(img_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    has_annotation = np.bincount(pos[known], minlength=len(img_ids)) > 0
    return boxes_xyxy, labels[order].astype(np.int64), offsets, has_annotation
