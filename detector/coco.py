"""COCO detection data: annotations read the way mmdetection reads them, samples built per view.

The dataset is indexed by (image index, view index). Annotations are parsed once, vectorised, into
one flat box table with per-image offsets (cheap to fork or pickle into loader workers, fast on
COCO train2017). Pixels are read only in __getitem__; a view's geometry comes from the json
width/height alone (see views.plan_view), so caches can be laid out without touching images.

mmdetection's rules, kept on purpose because results must be comparable:
- labels are indices into the sorted category ids;
- an annotation is used iff it is not crowd, not 'ignore', overlaps the image with positive area,
  has area > 0 and w >= 1 and h >= 1; its box is (x, y, x + w, y + h) in float32;
- training keeps an image iff it has at least one annotation (crowd and degenerate ones count,
  as in mmdet's filter_empty_gt, which looks at the category -> images index) and
  min(width, height) >= min_size. Evaluation keeps every image.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from detector.errors import UserError
from detector.views import ViewRecord, ViewSpec, build_view_input, plan_view, transform_boxes


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


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
            f"{_first_line(error)}; fix or regenerate the file"
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
            f"({_first_line(error)}); fix its 'categories'"
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


def _image_table(images: list[dict], ann_file: Path):
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
            f"({_first_line(error)}); fix its 'images'"
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


def _annotation_columns(annotations: list[dict], ann_file: Path):
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
            f"annotation file {ann_file} has a malformed annotation ({_first_line(error)}); fix it"
        ) from error
    # Annotations written without 'area' (some converters omit it) fall back to the box area.
    area = np.where(np.isnan(area), bbox[:, 2] * bbox[:, 3], area)
    return ann_ids, image_ids, cat_ids, bbox, area, crowd, ignore


def _box_table(annotations, img_ids, heights, widths, cat_ids, ann_file: Path):
    """Annotations -> usable boxes grouped by image, with mmdet's rules (see the module docstring).

    img_ids, heights, widths: [I] sorted by id. Returns boxes_xyxy [M, 4] float32 in original
    pixels, labels [M] int64, offsets [I + 1] (image i owns rows offsets[i]:offsets[i + 1], in
    annotation order) and has_annotation [I] (any annotation at all, for mmdet's empty filter).
    """
    columns = _annotation_columns(annotations, ann_file)
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


@dataclass
class Sample:
    """One view of one image, ready for the network."""

    image: torch.Tensor  # [3, Hp, Wp] float32, normalised, zero-padded
    boxes: torch.Tensor  # [N, 4] float32 xyxy in view pixels
    labels: torch.Tensor  # [N] int64 contiguous labels
    record: ViewRecord
    index: int  # dataset index of the image


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W], each image zero-padded bottom/right to the batch maximum
    boxes: list[torch.Tensor]  # per image [N_i, 4] in view pixels
    labels: list[torch.Tensor]  # per image [N_i]
    records: list[ViewRecord]
    indices: list[int]

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        return Batch(
            images=self.images.pin_memory(),
            boxes=[b.pin_memory() for b in self.boxes],
            labels=[lab.pin_memory() for lab in self.labels],
            records=self.records,
            indices=self.indices,
        )


def collate(samples: Sequence[Sample]) -> Batch:
    """Samples -> Batch; zero padding matches the per-image padding of build_view_input."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    max_h = max(s.image.shape[1] for s in samples)
    max_w = max(s.image.shape[2] for s in samples)
    images = samples[0].image.new_zeros((len(samples), 3, max_h, max_w))  # [B, 3, H, W]
    for i, s in enumerate(samples):
        images[i, :, : s.image.shape[1], : s.image.shape[2]] = s.image
    return Batch(
        images=images,
        boxes=[s.boxes for s in samples],
        labels=[s.labels for s in samples],
        records=[s.record for s in samples],
        indices=[s.index for s in samples],
    )


class CocoDetection(torch.utils.data.Dataset):
    """COCO json + image folder -> Samples, keyed by (image index, view index)."""

    def __init__(
        self,
        images_dir: str | Path,
        ann_file: str | Path,
        views: Sequence[ViewSpec],
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        train: bool = True,
        min_size: int = 32,
    ):
        if not views:
            raise ValueError("a dataset needs at least one view")
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.views = list(views)
        self.strides = tuple(strides)
        self.train = train
        self.min_size = min_size
        if not self.images_dir.is_dir():
            raise UserError(
                f"images directory {self.images_dir} does not exist; "
                "pass the folder that holds the images"
            )

        coco = load_coco(self.ann_file)
        categories = coco.dataset["categories"]
        self.cat_ids, self.class_names = categories_in_label_order(categories, self.ann_file)
        self.label_to_cat_id = self.cat_ids  # label -> COCO category id, for writing results
        img_ids, file_names, heights, widths = _image_table(coco.dataset["images"], self.ann_file)
        if len(img_ids) == 0:
            raise UserError(f"annotation file {self.ann_file} lists no images; check the file")
        annotations = coco.dataset.get("annotations", [])
        del coco  # the json as Python objects is large; keep only the tables below

        boxes_xyxy, labels, offsets, has_annotation = _box_table(
            annotations, img_ids, heights, widths, self.cat_ids, self.ann_file
        )

        keep = np.ones(len(img_ids), dtype=bool)
        if train:
            keep = has_annotation & (np.minimum(heights, widths) >= min_size)
        kept = np.nonzero(keep)[0]
        if len(kept) == 0:
            rule = f" with an annotation and a side >= {min_size} px" if train else ""
            raise UserError(f"annotation file {self.ann_file} has no images{rule}; check the file")

        self.image_ids = [int(i) for i in img_ids[kept]]
        self._file_names = [file_names[k] for k in kept]
        self._orig_hw = np.stack([heights[kept], widths[kept]], axis=1)  # [K, 2]
        self._box_start = offsets[kept]
        self._box_end = offsets[kept + 1]
        self._boxes_xyxy = boxes_xyxy
        self._labels = labels

    def __len__(self) -> int:
        return len(self.image_ids)

    @functools.cached_property
    def ann_sha256(self) -> str:
        """sha256 hex of the annotation file's bytes (part of a cache's dataset identity)."""
        digest = hashlib.sha256()
        with open(self.ann_file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def orig_hw(self, index: int) -> tuple[int, int]:
        h, w = self._orig_hw[index]
        return int(h), int(w)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self._file_names[index]

    def ground_truth(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Usable boxes of an image in original pixels: ([N, 4] float32 xyxy, [N] int64 labels)."""
        start, end = self._box_start[index], self._box_end[index]
        boxes = torch.from_numpy(self._boxes_xyxy[start:end].copy())
        labels = torch.from_numpy(self._labels[start:end].copy())
        return boxes, labels

    def check_files(self) -> None:
        """Fail before any work starts if an image the annotations reference is missing."""
        for index in range(len(self)):
            if not self.image_path(index).is_file():
                raise UserError(
                    f"image file {self.image_path(index)} not found, but {self.ann_file} references it (image id "
                    f"{self.image_ids[index]}); check the images directory"
                )

    def view_record(self, index: int, view_index: int = 0) -> ViewRecord:
        if not 0 <= view_index < len(self.views):
            raise IndexError(f"view index {view_index} out of range for {len(self.views)} views")
        spec = self.views[view_index]
        return plan_view(self.image_ids[index], self.orig_hw(index), spec, self.strides)

    def load_image(self, index: int) -> torch.Tensor:
        """The stored pixels as uint8 [3, H, W] RGB.

        EXIF orientation is deliberately not applied: COCO's width/height and boxes describe the
        pixel layout as stored in the file.
        """
        path = self.image_path(index)
        try:
            with Image.open(path) as image:
                rgb = np.array(image.convert("RGB"))  # [H, W, 3] uint8
        except FileNotFoundError as error:
            raise UserError(
                f"image file {path} not found, but {self.ann_file} references it "
                f"(image id {self.image_ids[index]}); check the images directory"
            ) from error
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise UserError(
                f"image file {path} cannot be read ({_first_line(error)}); "
                f"replace it or remove it from {self.ann_file}"
            ) from error
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, view_index = key if isinstance(key, tuple) else (key, 0)
        index, view_index = int(index), int(view_index)
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        record = self.view_record(index, view_index)
        try:
            image = build_view_input(self.load_image(index), record)  # [3, Hp, Wp]
        except ValueError as error:
            raise UserError(f"image file {self.image_path(index)}: {_first_line(error)}") from error
        boxes, labels = self.view_boxes(index, record)
        return Sample(image, boxes, labels, record, index)

    def view_boxes(self, index: int, record: ViewRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """The GT boxes of an image in a view's pixels ([N, 4], [N]): what the losses see (no pixels read)."""
        boxes, labels = self.ground_truth(index)
        boxes = transform_boxes(boxes, record)  # [N, 4] view pixels
        # Usable boxes overlap the image with positive area and the resize maps the image border to
        # the resized border exactly, so clipping keeps them non-empty; only float rounding can make
        # one empty. mmdet keeps every clipped box, so we drop only those with no extent at all.
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[nonempty], labels[nonempty]
