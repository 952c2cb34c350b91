"""What dump-teacher does, as data: DumpConfig, and the defaults it resolves at run time (the
synthetic dataset when no data is given, the scale the teacher was trained at when no scale is)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import metadata as importlib_metadata

from cache_teacher import schema
from cache_teacher.reader import parse_storage_options
from cache_teacher.writer import COMPRESSORS
from detector.checkpoint import read_checkpoint
from detector.config import check, param, parse_pair, parse_pairs
from detector.regions import VLR_IOUS
from detector.runtime import AMP_MODES
from detector.synthetic import SYNTHETIC_IMG_SCALE, synthetic_split
from detector.views import DEFAULT_IMG_SCALE

BOX_DTYPE_NAMES = {"fp16": "float16", "uint8": "uint8", "fp32": "float32"}  # the CLI's short names


@dataclass(frozen=True)
class DumpConfig:
    teacher: str = param(None, "teacher checkpoint (ours, or mmdetection GFL with architecture flags)",
                         shown="required")
    out: str = param("runs/teacher-cache.zarr", "Zarr v3 store to write: a folder or an fsspec URL")
    images: str | None = param(None, "image folder", shown="the synthetic dataset's")
    ann: str | None = param(None, "COCO annotation json", shown="the synthetic dataset's")
    views: str = param("orig,hflip", "views to cache per image: orig, hflip or both")
    img_scale: tuple[int, int] | None = param(None, "keep-ratio resize target LONG,SHORT",
                                              shown="the teacher's training scale, else 1333,800; 256,256 on the "
                                                    "synthetic data", parse=lambda t: parse_pair(t, "--img-scale"))
    extra_scales: tuple[tuple[int, int], ...] = param((), "more scales, each with the same views: 'L1,S1;L2,S2'",
                                                      shown="none", parse=lambda t: parse_pairs(t, "--extra-scales"))
    batch_size: int = param(8, "views per teacher forward (equal canvases only, so results do not change)")
    device: str = param("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    workers: int = param(2, "DataLoader worker processes")
    amp: str = param("auto", "auto (bf16 on CUDA), off, bf16 or fp16")
    box_dtype: str = param("float16", "fp16 (reference), uint8 (per row-edge affine, 0.66x the size) or fp32",
                           shown="fp16")
    cls: bool = param(True, "store the class logits (--no-cls: no Main KD from this cache)")
    compressor: str = param("none", "none, zstd or lz4 (fp16 logits compress weakly; none reads fastest)")
    shard_mb: float = param(64.0, "target shard size in MiB (the unit of writing and of resume)")
    overwrite: bool = param(False, "replace an existing store of another identity")
    arch: dict = param(help="architecture flags for checkpoints without a config (the [model] table / model flags)",
                       factory=dict, flag=False)
    storage_options: dict | None = param(None, "JSON of fsspec storage options for a URL, e.g. "
                                               "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (credentials also "
                                               "come from the usual environment variables)",
                                         shown="none", parse=parse_storage_options)
    store_regions: str = param("dense", "dense (every location) or main+vlr (only the rows LD and KD read)")
    min_vlr_gamma: float = param(0.25, "main+vlr: store the VLR for every gamma >= this")
    vlr_iou: str = param("official", "main+vlr: official or diou, as the students will use")

    def __post_init__(self):
        object.__setattr__(self, "box_dtype", BOX_DTYPE_NAMES.get(self.box_dtype, self.box_dtype))
        if self.img_scale is not None:
            object.__setattr__(self, "img_scale", tuple(int(v) for v in self.img_scale))
        object.__setattr__(self, "extra_scales", tuple(tuple(int(v) for v in s) for s in self.extra_scales))
        problems = []
        if not self.teacher:
            problems.append("--teacher is required (a teacher checkpoint)")
        if (self.images is None) != (self.ann is None):
            problems.append("give both --images and --ann (or neither, for the synthetic dataset)")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.box_dtype not in schema.BOX_DTYPES:
            problems.append(f"--box-dtype must be one of {sorted(BOX_DTYPE_NAMES)}, got {self.box_dtype!r}")
        if self.compressor not in COMPRESSORS:
            problems.append(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        if self.amp not in AMP_MODES:
            problems.append(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.shard_mb <= 0:
            problems.append("shard_mb must be > 0")
        if self.store_regions not in schema.REGION_KINDS:
            problems.append(f"store_regions must be one of {schema.REGION_KINDS}, got {self.store_regions!r}")
        if not 0 <= self.min_vlr_gamma <= 1:
            problems.append(f"min_vlr_gamma must be in [0, 1], got {self.min_vlr_gamma}")
        if self.vlr_iou not in VLR_IOUS:
            problems.append(f"vlr_iou must be one of {VLR_IOUS}, got {self.vlr_iou!r}")
        check(problems, "dump configuration")

    @property
    def cls_dtype(self) -> str | None:
        return "float16" if self.cls else None


def resolve_dump(cfg: DumpConfig) -> DumpConfig:
    """No data: the synthetic default at its own scale. No scale: the one our checkpoint's run
    was trained at, else mmdetection's 1333,800."""
    images, ann, scale = cfg.images, cfg.ann, cfg.img_scale
    if images is None:
        images, ann = (str(p) for p in synthetic_split("train"))
        scale = scale or SYNTHETIC_IMG_SCALE
    if scale is None:
        trained = read_checkpoint(cfg.teacher).get("run_config", {}).get("data", {}).get("img_scale")
        scale = tuple(trained) if trained else DEFAULT_IMG_SCALE
    return dataclasses.replace(cfg, images=str(images), ann=str(ann), img_scale=tuple(scale))


def package_version() -> str:
    try:
        return importlib_metadata.version("ldcache")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"
