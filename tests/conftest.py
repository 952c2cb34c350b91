import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))  # `python -m pytest` from a checkout without an install

# Two-core CI machines: keep torch from oversubscribing when tests run beside loader workers.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def mmdet_fixture():
    """Golden values written by tools/make_mmdet_fixtures.py with mmdetection 3.3.0."""
    return torch.load(FIXTURES / "mmdet_gfl.pt", weights_only=True)


TINY_MODEL = dict(depth=18, base_width=8, fpn_channels=16, head_channels=16, stacked_convs=1, gn_groups=4)
TINY_MODEL_FLAGS = ["--depth", "18", "--base-width", "8", "--fpn-channels", "16", "--head-channels", "16",
                    "--stacked-convs", "1", "--gn-groups", "4"]


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A tiny synthetic COCO dataset (5 classes, like the r18_small mmdet fixture; 10 train / 4 val images of
    <= 96 px)."""
    from data.synthetic import make_synthetic

    root = make_synthetic(tmp_path_factory.mktemp("data") / "tiny", num_train=10, num_val=4, image_size=96,
                          num_classes=5, seed=7)
    return {
        "root": root,
        "images": root / "train",
        "ann": root / "annotations" / "instances_train.json",
        "val_images": root / "val",
        "val_ann": root / "annotations" / "instances_val.json",
    }


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A randomly initialised small GFL (5 classes) saved as one of our checkpoints."""
    from detector import ModelConfig, build_detector, save_checkpoint

    torch.manual_seed(1)
    config = ModelConfig(num_classes=5, **TINY_MODEL)
    model = build_detector(config).eval()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, model, config)
    return {"path": path, "model": model, "config": config}


def dump_tiny_cache(tiny: dict, teacher, out, img_scale=(96, 96), shard_mb=0.05, **kw) -> Path:
    """Dump `teacher` over a tiny dataset in-process (small shards, so views cross shard boundaries)."""
    from cache_teacher.dump import DumpConfig, run_dump
    from data.config import DataConfig

    data = DataConfig(images=str(tiny["images"]), ann=str(tiny["ann"]), img_scale=img_scale)
    run_dump(DumpConfig(teacher=str(teacher), out=str(out), data=data, workers=0, shard_mb=shard_mb, **kw),
             progress=False)
    return Path(out)


@pytest.fixture(scope="session")
def tiny_cache(tiny_coco, tiny_teacher, tmp_path_factory):
    """The fp16 cache of tiny_teacher over tiny_coco at 96x96, both views. Shared: read it, never write it."""
    return dump_tiny_cache(tiny_coco, tiny_teacher["path"], tmp_path_factory.mktemp("tiny-cache") / "cache.zarr")


def store_array_files(store: Path) -> dict[str, bytes]:
    """Every stored object except the root metadata (whose attrs carry the creation time)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.relative_to(store) != Path("zarr.json")}


def equal_canvas_keys(dataset, cache, count: int = 6) -> list[tuple[int, int]]:
    """(image, view) keys of `count` cached views that share one padded canvas, original and flipped
    mixed: a batch the live teacher sees exactly as the cache's dump saw each view alone."""
    by_canvas: dict = {}
    for i in range(len(dataset)):
        for s in range(len(cache.specs)):
            by_canvas.setdefault(dataset.view_record(i, s).padded_hw, []).append((i, s))
    return max(by_canvas.values(), key=len)[:count]
