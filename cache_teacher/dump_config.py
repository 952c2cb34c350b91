"""What dump-teacher does, as data: DumpConfig, and the defaults it resolves at run time (the
synthetic dataset when no data is given, the scale the teacher was trained at when no scale is)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import metadata as importlib_metadata

from cache_teacher import schema
from cache_teacher.writer import COMPRESSORS
from core.config import check, param, validate_fields
from core.domains import Flag, JsonObject, Nested, OneOf, Range, Table
from core.paths import InputFile, OutputPath
from core.runtime import AMP_MODES, Device
from data.config import DataConfig
from detector.checkpoint import read_checkpoint, trained_img_scale
from detector.regions import VLR_IOUS

BOX_DTYPE_NAMES = {"fp16": "float16", "uint8": "uint8", "fp32": "float32"}  # the CLI's short names


@dataclass(frozen=True)
class DumpConfig:
    teacher: str = param(None, "teacher checkpoint (ours, or mmdetection GFL with architecture flags)",
                         InputFile("checkpoint file"), shown="required")
    out: str = param("runs/teacher-cache.zarr", "Zarr v3 store to write: a folder or an fsspec URL",
                     OutputPath("dir", url=True))
    data: DataConfig = param(help="the images (the [data] table / data flags)", domain=Nested(DataConfig),
                             factory=DataConfig, flag=False)
    batch_size: int = param(8, "views per teacher forward (equal canvases only, so results do not change)",
                            Range(1, 4096))
    device: str = param("auto", "auto (cuda when available), cpu, cuda or cuda:N", Device())
    workers: int = param(2, "DataLoader worker processes", Range(0, 256))
    amp: str = param("auto", "auto (bf16 on CUDA), off, bf16 or fp16", OneOf(*AMP_MODES))
    box_dtype: str = param("float16", "fp16 (reference), uint8 (per row-edge affine, 0.66x the size) or fp32",
                           OneOf(*dict.fromkeys([*BOX_DTYPE_NAMES, *schema.BOX_DTYPES])), shown="fp16")
    cls: bool = param(True, "store the class logits (--no-cls: no Main KD from this cache)", Flag())
    compressor: str = param("none", "none, zstd or lz4 (fp16 logits compress weakly; none reads fastest)",
                            OneOf(*COMPRESSORS))
    shard_mb: float = param(64.0, "target shard size in MiB (the unit of writing and of resume)",
                            Range(0, 65536, integer=False, low_open=True))
    overwrite: bool = param(False, "replace an existing store of another identity", Flag())
    arch: dict = param(help="architecture flags for checkpoints without a config (the [model] table / model flags)",
                       domain=Table(), factory=dict, flag=False)
    storage_options: dict | None = param(None, "JSON of fsspec storage options for a URL, e.g. "
                                               "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (credentials also "
                                               "come from the usual environment variables)", JsonObject(), shown="none")
    store_regions: str = param("dense", "dense (every location), main+vlr (only the rows LD and KD read) or "
                                        "ld+bckd (box logits at those rows; at every location the expected edges "
                                        "and the --cls-topk largest class logits: serves LD and BCKD, compact)",
                               OneOf(*schema.REGION_KINDS))
    # 4: the smallest k whose BCKD targets are within 0.3% (cls) and 2.4% (box) of dense, at 143 GB for
    # train2017's two views (docs/methods.md); k = 2 is 118 GB with 3.3% and 4.6%
    cls_topk: int = param(4, "ld+bckd: class logits stored per location (the others share one floor logit)",
                          Range(1, 4096))
    min_vlr_gamma: float = param(0.25, "main+vlr: store the VLR for every gamma >= this", Range(0, 1, integer=False))
    vlr_iou: str = param("official", "main+vlr: official or diou, as the students will use", OneOf(*VLR_IOUS))

    def __post_init__(self):
        validate_fields(self, "dump configuration")
        object.__setattr__(self, "box_dtype", BOX_DTYPE_NAMES.get(self.box_dtype, self.box_dtype))
        problems = []
        if not self.teacher:
            problems.append("--teacher is required (a teacher checkpoint)")
        if self.store_regions == "ld+bckd" and not self.cls:
            problems.append("--store-regions ld+bckd stores the class logits BCKD reads: drop --no-cls (or store "
                            "main+vlr)")
        check(problems, "dump configuration")

    @property
    def cls_dtype(self) -> str | None:
        return "float16" if self.cls else None


def resolve_dump(cfg: DumpConfig) -> DumpConfig:
    """The dump with its data resolved (data.config): the images given, else the synthetic train
    split; the scale given, else the one the teacher's run was trained at."""
    return dataclasses.replace(
        cfg, data=cfg.data.resolve("train", scale=trained_img_scale(read_checkpoint(cfg.teacher)))
    )


def package_version() -> str:
    try:
        return importlib_metadata.version("ldcache")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"
