"""The teacher cache contract (format v3; v1 and v2 caches are read as before): array names and the
metadata, parsed and validated once; the single source of truth for what a cache holds (for other
readers: docs/cache-format.md; where each view's rows lie: cache_teacher/layout.py).

A cache is one Zarr v3 group:
- attrs["ldcache"]: CacheMetadata.to_json() (identity, transform, dtypes, layout, state).
- box [R, 4(n+1)] and cls [R, C] (cls absent with --no-cls): teacher logits, one row per prior
  location; a view's rows are contiguous, in the order of detector.rows.
- box_lo, box_scale [R, 4] (uint8 box only): per row and edge, logit = lo + q * scale.
- views/*: the view table (layout.VIEW_FIELDS), one entry per view in physical (row) order.
- dataset/image_ids [N]: the dataset's ordered image ids; dataset/lookup [N, S]: the view index of
  (image index, view spec index); dataset/image_digests [N, 16] uint8 (v2): each image's
  CocoDetection.image_digest, so a run on a subset of the images can be checked image by image.
- progress [num_shards] uint8: 1 once a shard's write has returned (a chunk per shard: no sharing).
- location [R] int32 (region-sparse caches only): the row's index among its view's dense rows; a
  sparse view stores only the rows its distillation losses read (CacheMetadata.regions).

ld+bckd caches (v3) serve LD and BCKD compactly, in two row spaces sharing the shards. Dense rows
(every location; views/row_offset, num_rows): edges [R, 4] fp16 (expected edge distances, stride
units), cls_topk [R, k] fp16 + cls_index [R, k] uint8 (int16 above 256 classes): the k largest
logits and their classes, cls_floor [R] fp16: every other class (the logit of their mean
probability). Region rows (views/region_offset, region_rows: ATSS positives and the VLR band): box
(+ box_lo, box_scale) and location, as in a main+vlr cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np

from cache_teacher.layout import Layout
from core.errors import UserError
from data.views import PIXEL_MEAN, PIXEL_STD, SIZE_DIVISOR, ViewSpec

FORMAT_NAME = "ldcache.teacher_cache"
FORMAT_VERSION = 3  # v2: dataset/image_digests (subsets of one cache); v3: ld+bckd caches
READABLE_VERSIONS = (1, 2, 3)
ATTRS_KEY = "ldcache"
RESIZE_METHOD = "bilinear-half-pixel-round-v1"  # data.views.bilinear_resize + rounding to uint8

BOX, CLS, BOX_LO, BOX_SCALE = "box", "cls", "box_lo", "box_scale"
LOCATION = "location"  # region-sparse caches: each stored row's index among its view's dense rows
EDGES, CLS_TOPK, CLS_INDEX, CLS_FLOOR = "edges", "cls_topk", "cls_index", "cls_floor"  # ld+bckd caches
ROW_ARRAYS = (BOX, BOX_LO, BOX_SCALE, CLS, LOCATION, EDGES, CLS_TOPK, CLS_INDEX, CLS_FLOOR)
REGION_ARRAYS = (BOX, BOX_LO, BOX_SCALE, LOCATION)  # in an ld+bckd cache: the region row space
PROGRESS = "progress"
REGION_KINDS = ("dense", "main+vlr", "ld+bckd")
BOX_DTYPES = ("float16", "uint8", "float32")
CLS_DTYPES = ("float16", "float32")
TOPK_ENCODING = "topk+floor: the k largest logits at their classes, every other class cls_floor"
UINT8_QUANTIZATION = {"kind": "affine-per-row-edge", "formula": "logit = box_lo + q * box_scale",
                      "params_dtype": "float16", "arrays": [BOX_LO, BOX_SCALE]}
# What records a cache's history rather than what it holds: not part of its identity.
NOT_IDENTITY = ("created", "complete", "package_version", "source")


def image_ids_sha256(image_ids) -> str:
    return hashlib.sha256(np.asarray(image_ids, dtype=np.int64).tobytes()).hexdigest()


def transform_spec() -> dict:
    """Everything of the input transform a student must share with the teacher (besides the views)."""
    return {"resize": RESIZE_METHOD, "size_divisor": SIZE_DIVISOR, "pixel_mean": list(PIXEL_MEAN),
            "pixel_std": list(PIXEL_STD), "pad_value": 0.0, "flip": "horizontal-after-resize"}


@dataclass(frozen=True)
class Regions:
    """Which rows a cache stores: every prior location (dense), or main+vlr: the ATSS positives
    and the VLR band for every gamma >= min_vlr_gamma, selected with vlr_iou; or ld+bckd: box
    logits at those rows, and at every location the expected edges and the cls_topk largest
    class logits with a floor for the rest."""

    kind: str = "dense"
    min_vlr_gamma: float | None = None
    vlr_iou: str | None = None
    assigner: str | None = None
    rows_stored: int | None = None
    rows_dense: int | None = None
    cls_topk: int | None = None  # ld+bckd: class logits stored per location (the rest: one floor)

    @property
    def sparse(self) -> bool:
        return self.kind != "dense"

    @property
    def every_location(self) -> bool:
        """Does the cache hold something (class logits, expected edges) at every location?"""
        return self.kind != "main+vlr"

    @property
    def two_spaces(self) -> bool:  # ld+bckd: box logits in the region row space, the rest in the dense rows
        return self.kind == "ld+bckd"

    def to_json(self) -> dict:
        if not self.sparse:
            return {"kind": "dense"}
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k != "cls_topk"}


@dataclass(frozen=True)
class CacheLayout:
    """The shard geometry of the row arrays (numbers only; layout.Layout has the views' places)."""

    rows_per_shard: int
    chunk_rows: int
    num_shards: int
    total_rows: int
    compressor: str = "none"
    order: str = "padded_hw,image,spec"
    region_rows_per_shard: int | None = None  # ld+bckd: the region row space's shard and chunk rows
    region_chunk_rows: int | None = None

    def rows_per_shard_of(self, name: str, regions: Regions) -> int:
        """Rows of one shard of array `name` (the region space's own for an ld+bckd box array)."""
        region = regions.two_spaces and name in REGION_ARRAYS
        return self.region_rows_per_shard if region else self.rows_per_shard

    def to_json(self) -> dict:
        out = {"rows_per_shard": self.rows_per_shard, "chunk_rows": self.chunk_rows, "num_shards": self.num_shards,
               "total_rows": self.total_rows, "order": self.order, "compressor": self.compressor}
        if self.region_rows_per_shard is not None:
            out.update(region_rows_per_shard=self.region_rows_per_shard, region_chunk_rows=self.region_chunk_rows)
        return out


@dataclass(frozen=True)
class CacheMetadata:
    """attrs["ldcache"] of a cache, typed. from_json validates a stored document once (format v1 or
    v2); to_json writes the document of the cache's own format version, key for key as the
    ldcache that wrote it did."""

    teacher_config: dict  # the teacher's detector.config.ModelConfig as a dict
    teacher_sha256: str  # of the checkpoint file
    ann_sha256: str  # of the annotation file's bytes
    num_images: int
    image_ids_sha256: str  # of the ordered image ids (int64)
    specs: tuple[ViewSpec, ...]
    num_views: int
    strides: tuple[int, ...]
    reg_max: int
    num_classes: int
    box_dtype: str
    cls_dtype: str | None  # None: no class logits (--no-cls)
    layout: CacheLayout
    regions: Regions = Regions()
    transform: dict = field(default_factory=transform_spec)
    package_version: str = "0+unknown"
    created: str = ""
    complete: bool = False
    source: dict = field(default_factory=dict)  # where the dump found its inputs: hints, not identity
    precision: str | None = None  # the teacher's arithmetic (core.runtime.compute_precision); None: not recorded
    format_version: int = FORMAT_VERSION  # as stored: v1 caches are read as before

    def __post_init__(self):
        problems = []
        if self.box_dtype not in BOX_DTYPES:
            problems.append(f"box dtype must be one of {BOX_DTYPES}, got {self.box_dtype!r}")
        if self.cls_dtype is not None and self.cls_dtype not in CLS_DTYPES:
            problems.append(f"cls dtype must be one of {CLS_DTYPES} or none, got {self.cls_dtype!r}")
        if self.regions.kind not in REGION_KINDS:
            problems.append(f"regions must be one of {REGION_KINDS}, got {self.regions.kind!r}")
        if problems:
            raise UserError("invalid cache metadata: " + "; ".join(problems))

    @property
    def box_row_width(self) -> int:
        return 4 * (self.reg_max + 1)

    @property
    def has_cls(self) -> bool:
        return self.cls_dtype is not None

    def completed(self) -> CacheMetadata:
        return dataclasses.replace(self, complete=True)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "package_version": self.package_version,
            "created": self.created,
            "complete": self.complete,
            "source": dict(self.source),
            "teacher": {"model_config": self.teacher_config, "checkpoint_sha256": self.teacher_sha256},
            "dataset": {"ann_sha256": self.ann_sha256, "num_images": self.num_images,
                        "image_ids_sha256": self.image_ids_sha256},
            "transform": self.transform,
            "views": {"specs": [{"flip": s.flip, "img_scale": list(s.img_scale)} for s in self.specs],
                      "num_views": self.num_views},
            "regions": self.regions.to_json(),
            "strides": list(self.strides),
            "reg_max": self.reg_max,
            "num_classes": self.num_classes,
            "box": {"dtype": self.box_dtype, "quantization": UINT8_QUANTIZATION if self.box_dtype == "uint8" else None,
                    "row_width": self.box_row_width},
            "cls": None if self.cls_dtype is None else {"dtype": self.cls_dtype, "row_width": self.num_classes,
                                                        **({"encoding": TOPK_ENCODING, "k": self.regions.cls_topk}
                                                           if self.regions.two_spaces else {})},
            "layout": self.layout.to_json(),
            **({"precision": self.precision} if self.precision else {}),
        }

    @classmethod
    def from_json(cls, doc: dict, where: str) -> CacheMetadata:
        """The stored document -> CacheMetadata; UserError naming `where` for anything else."""
        if not is_cache_document(doc):
            raise UserError(f"{where} is not an ldcache teacher cache (no '{ATTRS_KEY}' metadata); pass a store "
                            "made by dump-teacher")
        if doc.get("format_version") not in READABLE_VERSIONS:
            raise UserError(f"{where} has cache format v{doc.get('format_version')} but this ldcache reads "
                            f"v{', v'.join(map(str, READABLE_VERSIONS))}; dump the teacher again or use the matching "
                            "ldcache version")
        try:
            return cls(
                teacher_config=dict(doc["teacher"]["model_config"]), teacher_sha256=doc["teacher"]["checkpoint_sha256"],
                ann_sha256=doc["dataset"]["ann_sha256"], num_images=int(doc["dataset"]["num_images"]),
                image_ids_sha256=doc["dataset"]["image_ids_sha256"],
                specs=tuple(ViewSpec(bool(s["flip"]), tuple(s["img_scale"])) for s in doc["views"]["specs"]),
                num_views=int(doc["views"]["num_views"]), strides=tuple(int(s) for s in doc["strides"]),
                reg_max=int(doc["reg_max"]), num_classes=int(doc["num_classes"]), box_dtype=doc["box"]["dtype"],
                cls_dtype=(doc["cls"] or {}).get("dtype"), layout=CacheLayout(**doc["layout"]),
                regions=Regions(**doc.get("regions", {"kind": "dense"})), transform=dict(doc["transform"]),
                package_version=doc.get("package_version", "0+unknown"), created=doc.get("created", ""),
                complete=bool(doc.get("complete")), source=dict(doc.get("source") or {}),
                precision=doc.get("precision"), format_version=int(doc["format_version"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where} has damaged ldcache metadata ({type(err).__name__}: {err}); dump the "
                            "teacher again") from None

    def identity(self) -> dict:
        """What makes two dumps the same cache (not when, by which version or from which paths)."""
        return {k: v for k, v in self.to_json().items() if k not in NOT_IDENTITY}

    def identity_differences(self, other: CacheMetadata) -> list[str]:
        """Top-level identity entries in which two caches differ (the dump's overwrite refusal)."""
        mine, theirs = self.identity(), other.identity()
        if "precision" not in mine or "precision" not in theirs:  # a cache from before it was recorded
            mine, theirs = ({k: v for k, v in d.items() if k != "precision"} for d in (mine, theirs))
        return [k for k in dict.fromkeys([*mine, *theirs]) if mine.get(k) != theirs.get(k)]

    def mismatches(self, **expected) -> list[str]:
        """What a run needs against what the cache holds, one readable line per mismatch. `expected`
        may hold any of: teacher_sha256, teacher_config, ann_sha256, image_ids, num_classes,
        strides, reg_max, transform, specs (view specs that must all be cached)."""
        out = []

        def differ(name, have, want):
            if have != want:
                out.append(f"{name}: cache has {have!r}, run needs {want!r}")

        if "teacher_sha256" in expected:
            differ("teacher checkpoint sha256", self.teacher_sha256[:12], expected["teacher_sha256"][:12])
        if "teacher_config" in expected:
            have, want = self.teacher_config, expected["teacher_config"]
            if diffs := [k for k in sorted({*have, *want}) if have.get(k) != want.get(k)]:
                out.append(f"teacher architecture differs in {', '.join(diffs)}")
        if "ann_sha256" in expected:
            differ("annotation file sha256", self.ann_sha256[:12], expected["ann_sha256"][:12])
        if "image_ids" in expected and self.image_ids_sha256 != image_ids_sha256(expected["image_ids"]):
            out.append(f"image ids: cache has {self.num_images} images in another set or order than the "
                       f"run's {len(expected['image_ids'])}")
        for key in ("num_classes", "reg_max"):
            if key in expected:
                differ(key, getattr(self, key), int(expected[key]))
        if "strides" in expected:
            differ("strides", list(self.strides), [int(s) for s in expected["strides"]])
        if "transform" in expected:
            have, want = self.transform, expected["transform"]
            for k in sorted({*have, *want}):
                differ(f"transform {k}", have.get(k), want.get(k))
        if "specs" in expected:
            if missing := [s.name for s in expected["specs"] if s not in self.specs]:
                out.append(f"views {missing} are not cached (cache has {[s.name for s in self.specs]})")
        return out


def is_cache_document(doc: dict) -> bool:
    return isinstance(doc, dict) and doc.get("format") == FORMAT_NAME


def build_metadata(*, teacher_config: dict, teacher_sha256: str, ann_sha256: str, image_ids, specs: list[ViewSpec],
                   strides, reg_max: int, num_classes: int, box_dtype: str, cls_dtype: str | None, layout: Layout,
                   compressor: str, package_version: str, created: str, source: dict | None = None,
                   regions: Regions = Regions(), precision: str | None = None) -> CacheMetadata:
    """The metadata of a cache about to be dumped (not complete yet)."""
    return CacheMetadata(
        teacher_config=teacher_config, teacher_sha256=teacher_sha256, ann_sha256=ann_sha256,
        num_images=len(image_ids), image_ids_sha256=image_ids_sha256(image_ids), specs=tuple(specs),
        num_views=len(layout.records), strides=tuple(int(s) for s in strides), reg_max=int(reg_max),
        num_classes=int(num_classes), box_dtype=box_dtype, cls_dtype=cls_dtype,
        layout=CacheLayout(layout.rows_per_shard, layout.chunk_rows, layout.num_shards, layout.total_rows, compressor,
                           region_rows_per_shard=layout.region_rows_per_shard,
                           region_chunk_rows=layout.region_chunk_rows),
        regions=regions, package_version=package_version, created=created, source=dict(source or {}),
        precision=precision)
