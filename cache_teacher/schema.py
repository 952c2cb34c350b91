"""The teacher cache contract (format v1): names, layout rules and validation. The single source
of truth for what a cache holds; docs/cache-format.md describes the same thing for other readers.

A cache is one Zarr v3 group:
- attrs["ldcache"]: the metadata dict built by `build_metadata` (identity, transform, dtypes...).
- box [R, 4(n+1)] and cls [R, C] (cls absent with --no-cls): teacher logits, one row per prior
  location; a view's rows are contiguous, level-major (P3 first), then y, then x.
- box_lo, box_scale [R, 4] (uint8 box only): per row and edge, logit = lo + q * scale.
- views/*: the view table, one entry per view in physical (row) order.
- dataset/image_ids [N]: the dataset's ordered image ids; dataset/lookup [N, S]: the view index of
  (image index, view spec index).
- progress [num_shards] uint8: 1 once a shard's write has returned (one chunk per shard, so writers
  never share an object).
- location [R] int32 (region-sparse caches only): the row's index among its view's dense rows; a
  sparse view stores only the rows its distillation losses read (attrs["ldcache"]["regions"]).

Layout: views are ordered by padded canvas, then image, then view spec, so a dump can batch equal
canvases (GroupNorm makes a view's maps depend on its canvas); they are packed into shards of
rows_per_shard rows without straddling a shard boundary; each shard is written whole by one writer,
and the unused tail of a shard is fill value (nothing on disk when a whole inner chunk is unused).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from detector.errors import UserError
from detector.views import PIXEL_MEAN, PIXEL_STD, SIZE_DIVISOR, ViewRecord, ViewSpec

FORMAT_NAME = "ldcache.teacher_cache"
FORMAT_VERSION = 1
ATTRS_KEY = "ldcache"
RESIZE_METHOD = "bilinear-half-pixel-round-v1"  # detector.views.bilinear_resize + rounding to uint8

BOX, CLS, BOX_LO, BOX_SCALE = "box", "cls", "box_lo", "box_scale"
LOCATION = "location"  # region-sparse caches: each stored row's index among its view's dense rows
ROW_ARRAYS = (BOX, BOX_LO, BOX_SCALE, CLS, LOCATION)
REGION_KINDS = ("dense", "main+vlr")
PROGRESS = "progress"
VIEW_FIELDS = ("image_id", "image_index", "spec_index", "flip", "img_scale", "orig_hw", "resized_hw",
               "padded_hw", "level_hw", "row_offset", "num_rows")
BOX_DTYPES = ("float16", "uint8", "float32")
CLS_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Layout:
    """Where every view's rows live. Arrays are in physical view order."""

    records: list[ViewRecord]
    image_index: np.ndarray  # [V] dataset index of each view's image
    spec_index: np.ndarray  # [V] index into the view specs
    row_offset: np.ndarray  # [V] int64
    num_rows: np.ndarray  # [V] int64
    shard_of_view: np.ndarray  # [V] int64
    rows_per_shard: int
    chunk_rows: int
    num_shards: int

    @property
    def total_rows(self) -> int:
        return self.num_shards * self.rows_per_shard

    def views_of_shard(self, shard: int) -> range:
        idx = np.nonzero(self.shard_of_view == shard)[0]
        return range(int(idx[0]), int(idx[-1]) + 1) if len(idx) else range(0)

    def lookup(self, num_images: int, num_specs: int) -> np.ndarray:
        table = np.full((num_images, num_specs), -1, dtype=np.int64)
        table[self.image_index, self.spec_index] = np.arange(len(self.records))
        return table


def _pow2_floor(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def plan_layout(records_per_image: list[list[ViewRecord]], row_bytes: int, shard_mb: float = 64.0,
                chunk_rows: int | None = None, rows_per_view: list[list[int]] | None = None) -> Layout:
    """records_per_image[i][s] = view s of image i -> the physical layout (pure arithmetic).
    rows_per_view[i][s] overrides a view's row count (region-sparse caches store fewer rows)."""
    entries = [(rec.padded_hw, i, s, rec) for i, recs in enumerate(records_per_image) for s, rec in enumerate(recs)]
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    count = (lambda e: rows_per_view[e[1]][e[2]]) if rows_per_view is not None else (lambda e: e[3].num_rows)
    rows = np.array([count(e) for e in entries], dtype=np.int64)
    if len(rows) == 0:
        raise UserError("the dataset has no images to cache; check the annotation file")
    if chunk_rows is None:
        # Small enough that reading one view over-reads little, large enough to keep the shard index small.
        typical = int(np.median(rows[rows > 0])) if (rows > 0).any() else 1
        chunk_rows = min(16384, max(128, _pow2_floor(typical // 2)))
    max_rows = int(rows.max())
    target = int(shard_mb * 2**20 / max(row_bytes, 1))
    rows_per_shard = max(target, max_rows)
    rows_per_shard = -(-rows_per_shard // chunk_rows) * chunk_rows  # whole inner chunks
    offsets, shards = np.zeros_like(rows), np.zeros_like(rows)
    shard, used = 0, 0
    for v, n in enumerate(rows):
        if used + n > rows_per_shard:  # a view never straddles two shards
            shard, used = shard + 1, 0
        offsets[v], shards[v] = shard * rows_per_shard + used, shard
        used += n
    return Layout(
        records=[e[3] for e in entries],
        image_index=np.array([e[1] for e in entries], dtype=np.int64),
        spec_index=np.array([e[2] for e in entries], dtype=np.int64),
        row_offset=offsets, num_rows=rows, shard_of_view=shards,
        rows_per_shard=rows_per_shard, chunk_rows=chunk_rows, num_shards=shard + 1,
    )


def view_table(layout: Layout) -> dict[str, np.ndarray]:
    """The views/* arrays of a layout."""
    recs = layout.records
    return {
        "image_id": np.array([r.image_id for r in recs], dtype=np.int64),
        "image_index": layout.image_index,
        "spec_index": layout.spec_index,
        "flip": np.array([r.flip for r in recs], dtype=np.uint8),
        "img_scale": np.array([r.img_scale for r in recs], dtype=np.int32).reshape(-1, 2),
        "orig_hw": np.array([r.orig_hw for r in recs], dtype=np.int32).reshape(-1, 2),
        "resized_hw": np.array([r.resized_hw for r in recs], dtype=np.int32).reshape(-1, 2),
        "padded_hw": np.array([r.padded_hw for r in recs], dtype=np.int32).reshape(-1, 2),
        "level_hw": np.array([r.level_hw for r in recs], dtype=np.int32),
        "row_offset": layout.row_offset,
        "num_rows": layout.num_rows,
    }


def records_from_table(table: dict[str, np.ndarray]) -> list[ViewRecord]:
    return [
        ViewRecord(
            image_id=int(table["image_id"][v]), flip=bool(table["flip"][v]),
            img_scale=tuple(int(x) for x in table["img_scale"][v]), orig_hw=tuple(int(x) for x in table["orig_hw"][v]),
            resized_hw=tuple(int(x) for x in table["resized_hw"][v]),
            padded_hw=tuple(int(x) for x in table["padded_hw"][v]),
            level_hw=tuple(tuple(int(x) for x in hw) for hw in table["level_hw"][v]),
        )
        for v in range(len(table["image_id"]))
    ]


def image_ids_sha256(image_ids) -> str:
    return hashlib.sha256(np.asarray(image_ids, dtype=np.int64).tobytes()).hexdigest()


def transform_spec() -> dict:
    """Everything of the input transform a student must share with the teacher (besides the views)."""
    return {"resize": RESIZE_METHOD, "size_divisor": SIZE_DIVISOR, "pixel_mean": list(PIXEL_MEAN),
            "pixel_std": list(PIXEL_STD), "pad_value": 0.0, "flip": "horizontal-after-resize"}


def specs_to_json(specs: list[ViewSpec]) -> list[dict]:
    return [{"flip": s.flip, "img_scale": list(s.img_scale)} for s in specs]


def specs_from_json(items: list[dict]) -> list[ViewSpec]:
    return [ViewSpec(flip=bool(d["flip"]), img_scale=tuple(d["img_scale"])) for d in items]


def build_metadata(*, teacher_config: dict, teacher_sha256: str, ann_sha256: str, image_ids, num_images: int,
                   specs: list[ViewSpec], strides, reg_max: int, num_classes: int, box_dtype: str,
                   cls_dtype: str | None, layout: Layout, compressor: str, package_version: str,
                   created: str, source: dict | None = None, regions: dict | None = None) -> dict:
    if box_dtype not in BOX_DTYPES:
        raise UserError(f"box dtype must be one of {BOX_DTYPES}, got {box_dtype!r}")
    if cls_dtype is not None and cls_dtype not in CLS_DTYPES:
        raise UserError(f"cls dtype must be one of {CLS_DTYPES} or none, got {cls_dtype!r}")
    quant = None
    if box_dtype == "uint8":
        quant = {"kind": "affine-per-row-edge", "formula": "logit = box_lo + q * box_scale",
                 "params_dtype": "float16", "arrays": [BOX_LO, BOX_SCALE]}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": package_version,
        "created": created,
        "complete": False,
        # Where the inputs were found when dumping: hints for inspect-cache, not part of the identity.
        "source": source or {},
        "teacher": {"model_config": teacher_config, "checkpoint_sha256": teacher_sha256},
        "dataset": {"ann_sha256": ann_sha256, "num_images": int(num_images), "image_ids_sha256": image_ids_sha256(image_ids)},
        "transform": transform_spec(),
        "views": {"specs": specs_to_json(specs), "num_views": len(layout.records)},
        "regions": regions or {"kind": "dense"},
        "strides": [int(s) for s in strides],
        "reg_max": int(reg_max),
        "num_classes": int(num_classes),
        "box": {"dtype": box_dtype, "quantization": quant, "row_width": 4 * (reg_max + 1)},
        "cls": None if cls_dtype is None else {"dtype": cls_dtype, "row_width": int(num_classes)},
        "layout": {"rows_per_shard": layout.rows_per_shard, "chunk_rows": layout.chunk_rows,
                   "num_shards": layout.num_shards, "total_rows": layout.total_rows, "order": "padded_hw,image,spec",
                   "compressor": compressor},
    }


def check_format(meta: dict, where: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise UserError(f"{where} is not an ldcache teacher cache (no '{ATTRS_KEY}' metadata); pass a store made by dump-teacher")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{where} has cache format v{meta.get('format_version')} but this ldcache reads v{FORMAT_VERSION}; "
                        "dump the teacher again or use the matching ldcache version")


def identity_mismatches(meta: dict, expected: dict) -> list[str]:
    """Compare a cache's metadata with what a run needs. `expected` may hold any of: teacher_sha256,
    teacher_config, ann_sha256, image_ids, num_classes, strides, reg_max, transform, specs (list of
    ViewSpec that must all be cached). Returns one readable line per mismatch."""
    out = []

    def differ(name, have, want):
        if have != want:
            out.append(f"{name}: cache has {have!r}, run needs {want!r}")

    if "teacher_sha256" in expected:
        differ("teacher checkpoint sha256", meta["teacher"]["checkpoint_sha256"][:12], expected["teacher_sha256"][:12])
    if "teacher_config" in expected:
        have = meta["teacher"]["model_config"]
        diffs = [k for k in sorted(set(have) | set(expected["teacher_config"])) if have.get(k) != expected["teacher_config"].get(k)]
        if diffs:
            out.append(f"teacher architecture differs in {', '.join(diffs)}")
    if "ann_sha256" in expected:
        differ("annotation file sha256", meta["dataset"]["ann_sha256"][:12], expected["ann_sha256"][:12])
    if "image_ids" in expected:
        if meta["dataset"]["image_ids_sha256"] != image_ids_sha256(expected["image_ids"]):
            out.append(f"image ids: cache has {meta['dataset']['num_images']} images in another set or order than the "
                       f"run's {len(expected['image_ids'])}")
    for key in ("num_classes", "reg_max"):
        if key in expected:
            differ(key, meta[key], int(expected[key]))
    if "strides" in expected:
        differ("strides", meta["strides"], [int(s) for s in expected["strides"]])
    if "transform" in expected:
        have, want = meta["transform"], expected["transform"]
        for k in sorted(set(have) | set(want)):
            if have.get(k) != want.get(k):
                out.append(f"transform {k}: cache has {have.get(k)!r}, run needs {want.get(k)!r}")
    if "specs" in expected:
        cached = specs_from_json(meta["views"]["specs"])
        missing = [s.name for s in expected["specs"] if s not in cached]
        if missing:
            out.append(f"views {missing} are not cached (cache has {[s.name for s in cached]})")
    return out
