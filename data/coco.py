"""COCO detection data: the dataset of views the teacher and the student read (annotations parsed
by data/coco_json.py), samples built per view, and batches.

The dataset is indexed by (image index, view index). Annotations are parsed once, vectorised, into
one flat box table with per-image offsets (cheap to fork or pickle into loader workers, fast on
COCO train2017). Pixels are read only in __getitem__; a view's geometry comes from the json
width/height alone (see views.plan_view), so caches can be laid out without touching images.
Training keeps an image iff it has at least one annotation (crowd and degenerate ones count, as in
mmdet's filter_empty_gt) and min(width, height) >= min_size; evaluation keeps every image.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.errors import UserError, first_line
from data.coco_json import box_table, categories_in_label_order, image_table, load_coco
from data.views import ViewRecord, ViewSpec, build_view_input, plan_view, transform_boxes


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """An opened image's pixels as uint8 [H, W, 3] RGB. 16-bit grey (a 16-bit PNG opens as I;16 or I)
    keeps its high byte, as OpenCV (mmdetection's reader) does: PIL's convert("RGB") would clip
    every value above 255 to white."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        grey = (np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(image.convert("RGB"))


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
        img_ids, file_names, heights, widths = image_table(coco.dataset["images"], self.ann_file)
        if len(img_ids) == 0:
            raise UserError(f"annotation file {self.ann_file} lists no images; check the file")
        annotations = coco.dataset.get("annotations", [])
        del coco  # the json as Python objects is large; keep only the tables below

        boxes_xyxy, labels, offsets, has_annotation = box_table(
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

    def subset(self, indices) -> CocoDetection:
        """The same dataset restricted to these image indices (in this order); the annotation file
        and its sha256 stay those of the whole dataset."""
        part = copy.copy(self)
        indices = [int(i) for i in indices]
        part.image_ids = [self.image_ids[i] for i in indices]
        part._file_names = [self._file_names[i] for i in indices]
        part._orig_hw, part._box_start, part._box_end = (a[indices] for a in (self._orig_hw, self._box_start,
                                                                               self._box_end))
        return part

    def image_digest(self, index: int) -> bytes:
        """16 bytes that change when anything the training reads of an image changes: its id, file
        name, size, and its usable boxes and labels."""
        boxes, labels = self.ground_truth(index)
        h, w = self.orig_hw(index)
        digest = hashlib.sha256(f"{self.image_ids[index]}|{self._file_names[index]}|{h}|{w}|".encode())
        digest.update(boxes.numpy().astype("<f4").tobytes())
        digest.update(labels.numpy().astype("<i8").tobytes())
        return digest.digest()[:16]

    def image_digests(self) -> np.ndarray:
        """[N, 16] uint8: image_digest of every image, in dataset order."""
        return np.frombuffer(b"".join(self.image_digest(i) for i in range(len(self))), dtype=np.uint8).reshape(-1, 16)

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
                rgb = rgb_pixels(image)  # [H, W, 3] uint8
        except FileNotFoundError as error:
            raise UserError(
                f"image file {path} not found, but {self.ann_file} references it "
                f"(image id {self.image_ids[index]}); check the images directory"
            ) from error
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise UserError(
                f"image file {path} cannot be read ({first_line(error)}); "
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
            raise UserError(f"image file {self.image_path(index)}: {first_line(error)}") from error
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
