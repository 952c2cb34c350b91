"""Shared pieces of the benchmark scripts: options for the teacher and the data, a random teacher
saved as a checkpoint, a subset annotation file, median timing, markdown tables and the JSON record
(parameters, environment, date and command line) written beside every result.

Benchmarks are run from the repository root: `.venv/bin/python benchmarks/<script>.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness.step_worker import sync  # noqa: F401  (one device sync for every benchmark)
from data.coco import CocoDetection
from data.views import parse_views
from detector.checkpoint import read_checkpoint, resolve_model_config, save_checkpoint
from detector.config import ModelConfig
from detector.model import build_detector

REPO_ROOT = Path(__file__).resolve().parents[2]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
TEACHER_RECIPE = REPO_ROOT / "configs" / "synthetic-teacher.toml"
# The architecture of configs/synthetic-teacher.toml, used when that file cannot be read.
FALLBACK_ARCH = dict(depth=34, base_width=32, fpn_channels=128, head_channels=128, stacked_convs=4)


# -- options --------------------------------------------------------------------------------------
def parse_pair(text: str) -> tuple[int, int]:
    """'256,256' -> (256, 256)."""
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers 'LONG,SHORT', got {text!r}")
    return parts[0], parts[1]


def _recipe_arch() -> dict:
    try:
        model = tomllib.loads(TEACHER_RECIPE.read_text())["model"]
        return {k: int(model[k]) for k in FALLBACK_ARCH}
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
        return dict(FALLBACK_ARCH)


def read_recipe_model(path: Path) -> dict:
    """The [model] table of a TOML recipe (configs/*.toml), or {} when it cannot be read."""
    try:
        return dict(tomllib.loads(Path(path).read_text()).get("model", {}))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def add_teacher_args(parser: argparse.ArgumentParser) -> None:
    arch = _recipe_arch()
    g = parser.add_argument_group("teacher (random weights of this architecture unless --teacher is given)")
    g.add_argument(
        "--teacher", help="an ldcache checkpoint; default: a random teacher (seeded) of the architecture below"
    )
    g.add_argument("--depth", type=int, default=arch["depth"])
    g.add_argument("--base-width", type=int, default=arch["base_width"])
    g.add_argument("--fpn-channels", type=int, default=arch["fpn_channels"])
    g.add_argument("--head-channels", type=int, default=arch["head_channels"])
    g.add_argument("--stacked-convs", type=int, default=arch["stacked_convs"])
    g.add_argument("--seed", type=int, default=0, help="seed of the random teacher and of random read orders")


def add_data_args(parser: argparse.ArgumentParser, num_images: int) -> None:
    g = parser.add_argument_group("data (default: the synthetic training split)")
    g.add_argument("--images", help="image folder (default: the synthetic dataset's train/)")
    g.add_argument("--ann", help="COCO annotation json (default: the synthetic dataset's instances_train.json)")
    g.add_argument("--num-images", type=int, default=num_images,
                   help="keep the first N images of the annotation file (0: all)")
    g.add_argument("--img-scale", type=parse_pair, default=(256, 256), help="LONG,SHORT of the views")
    g.add_argument("--views", default="orig,hflip")


def add_run_args(parser: argparse.ArgumentParser, script: str) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the main process (0: torch's default). Default 1: on a "
                             "shared CPU, OpenMP threads of two busy processes spin against each other and both "
                             "slow down by an order of magnitude, which makes timings meaningless")
    parser.add_argument("--workdir", help="where temporary stores go (default: a new temp folder, deleted after)")
    parser.add_argument("--out", default=str(RESULTS_DIR / f"{script}.json"), help="result JSON")


@contextlib.contextmanager
def work_folder(path: str | None, keep: bool = False):
    """The folder temporary stores go to: `path`, or a new temporary folder removed afterwards."""
    owned = path is None and not keep
    folder = Path(tempfile.mkdtemp(prefix="ldcache-bench-")) if owned else Path(path or ".")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)


def resolve_device(name: str) -> torch.device:
    from core.runtime import resolve_device as resolve  # the project's one device rule

    return resolve(name)


def apply_threads(args) -> None:
    """Before any DataLoader is built (its workers always run one thread each)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)


# -- data and teacher -----------------------------------------------------------------------------
def prepare_data(args, workdir: Path) -> tuple[str, str]:
    """(images dir, annotation json); with --num-images N, a json holding the first N images of the
    file and their annotations, written deterministically so that its sha256 (part of a cache's
    dataset identity) is the same on every run."""
    if args.images is None or args.ann is None:
        from data.synthetic import ensure_synthetic_default

        root = ensure_synthetic_default()
        images = args.images or str(root / "train")
        ann = args.ann or str(root / "annotations" / "instances_train.json")
    else:
        images, ann = args.images, args.ann
    if not args.num_images:
        return images, ann
    coco = json.loads(Path(ann).read_text())
    kept = coco["images"][: args.num_images]
    ids = {im["id"] for im in kept}
    subset = {**coco, "images": kept, "annotations": [a for a in coco.get("annotations", []) if a["image_id"] in ids]}
    out = workdir / f"subset-{len(kept)}-{Path(ann).name}"
    out.write_text(json.dumps(subset, sort_keys=True))
    return images, str(out)


def build_dataset(images: str, ann: str, args, strides) -> CocoDetection:
    return CocoDetection(images, ann, views=parse_views(args.views, args.img_scale), strides=strides, train=True)


def dump_batches(dataset: CocoDetection, teacher_cfg: ModelConfig, box_dtype: str, cls_dtype: str | None,
                 shard_mb: float, batch_size: int):
    """The batches run_dump forms for a fresh dense store, as [(image index, spec index), ...] per
    batch, and the layout (cache_teacher.plan: the dump's own plan)."""
    from cache_teacher.plan import plan_dump, shard_batches, view_keys

    layout = plan_dump(dataset, teacher_cfg, box_dtype=box_dtype, cls_dtype=cls_dtype, shard_mb=shard_mb).layout
    return view_keys(layout, shard_batches(layout, range(layout.num_shards), batch_size)), layout


def num_classes_of(ann: str) -> int:
    return len(json.loads(Path(ann).read_text())["categories"])


def prepare_teacher(args, num_classes: int, workdir: Path) -> tuple[str, ModelConfig, bool]:
    """(checkpoint path, architecture, random?). Without --teacher: a seeded random teacher of the
    chosen architecture saved to workdir. Throughput does not depend on the weights; fidelity does
    (random heads give near-flat box logits), so results say which one was used."""
    if args.teacher:
        config = resolve_model_config(read_checkpoint(args.teacher))
        return args.teacher, config, False
    config = ModelConfig(depth=args.depth, num_classes=num_classes, base_width=args.base_width,
                         fpn_channels=args.fpn_channels, head_channels=args.head_channels,
                         stacked_convs=args.stacked_convs, frozen_stages=0, norm_eval=False)
    torch.manual_seed(args.seed)
    model = build_detector(config).eval()
    path = workdir / f"random-teacher-seed{args.seed}.pt"
    save_checkpoint(path, model, config)
    return str(path), config, True


def teacher_summary(path: str, config: ModelConfig, random_weights: bool) -> dict:
    return {"checkpoint": None if random_weights else path, "random_weights": random_weights,
            "depth": config.depth, "base_width": config.base_width, "fpn_channels": config.fpn_channels,
            "head_channels": config.head_channels, "stacked_convs": config.stacked_convs,
            "num_classes": config.num_classes, "reg_max": config.reg_max}


def describe_teacher(t: dict) -> str:
    weights = "RANDOM weights (fine for throughput, NOT representative for fidelity)" if t["random_weights"] \
        else f"weights from {t['checkpoint']}"
    return (f"teacher GFL R-{t['depth']} width {t['base_width']}, fpn {t['fpn_channels']}, head "
            f"{t['head_channels']}x{t['stacked_convs']}, {t['num_classes']} classes; {weights}")


# -- timing ---------------------------------------------------------------------------------------
def median(values) -> float:
    return float(statistics.median(values))


# -- output ---------------------------------------------------------------------------------------
def fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return format(value, spec) if spec else str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), spec) for k, _, spec in columns) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: torch.device) -> dict:
    import zarr

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": list(os.getloadavg()),  # other jobs on the machine make numbers noisy
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = f"{env['cpu']} ({env['cpu_cores']} cores)"
    return env


def write_results(out: str, args, rows: list[dict], device: torch.device, **extra) -> Path:
    """The result JSON: rows, every parameter, environment, date and the exact command line."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    script = Path(sys.argv[0]).resolve()
    try:  # run as python -m benchmarks.GROUP.NAME: record it so
        module = ".".join(script.relative_to(REPO_ROOT).with_suffix("").parts)
        argv = ["-m", module, *sys.argv[1:]]
    except ValueError:
        module, argv = script.name, sys.argv
    record = {
        "script": module,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *argv]),
        "cwd": os.getcwd(),
        "parameters": params,
        "environment": environment(device),
        **extra,
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
