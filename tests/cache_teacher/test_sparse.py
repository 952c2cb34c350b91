"""Region-sparse caches: only the rows the losses read, the same student losses as dense."""

import pytest
import torch

from cache_teacher.inspect import summarize
from cache_teacher.reader import CacheReader
from cache_teacher.targets import CachedTeacher
from core.errors import UserError
from data.coco import CocoDetection
from detector import ModelConfig, build_detector
from distill.config import LossConfig
from distill.criterion import compute_losses
from tests.cli_runner import assert_user_error, run_cli
from tests.conftest import TINY_MODEL, dump_tiny_cache


def dump_at_160(tiny, teacher, out, **kw):
    return CacheReader(dump_tiny_cache(tiny, teacher, out, img_scale=(160, 160), shard_mb=0.2, **kw))


@pytest.fixture(scope="module")
def caches(tiny_coco, tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    dense = dump_at_160(tiny_coco, tiny_teacher["path"], root / "dense.zarr")
    sparse = dump_at_160(
        tiny_coco, tiny_teacher["path"], root / "sparse.zarr", store_regions="main+vlr", min_vlr_gamma=0.25
    )
    return dense, sparse


def test_sparse_cache_is_smaller_and_says_so(caches):
    dense, sparse = caches
    d, s = summarize(dense), summarize(sparse)
    assert s["regions"]["kind"] == "main+vlr" and s["regions"]["rows_dense"] == d["rows"]
    assert s["rows"] == s["regions"]["rows_stored"] < 0.5 * d["rows"]  # most locations are never distilled
    assert s["bytes_on_disk_total"] < 0.7 * d["bytes_on_disk_total"]


def cache_losses(tiny, cache, cfg, keys):
    dataset = CocoDetection(tiny["images"], tiny["ann"], views=cache.specs, train=True)
    teacher = CachedTeacher(cache)
    teacher.validate(dataset, ModelConfig(num_classes=5, **TINY_MODEL), cfg.teacher_needs())
    batch, stored = teacher.collate([teacher.dataset(dataset, cfg.teacher_needs())[k] for k in keys])
    torch.manual_seed(0)
    student = build_detector(ModelConfig(num_classes=5, **TINY_MODEL)).train()
    cls_out, box_out = student(batch.images)
    rows = teacher.rows(batch, stored, torch.device("cpu"))
    return compute_losses(cls_out, box_out, [r.level_hw for r in batch.records], batch.boxes, batch.labels, cfg, 5, 16,
                          (8, 16, 32, 64, 128), teacher_rows=rows)


@pytest.mark.parametrize("gamma", [0.25, 0.6])
def test_sparse_gives_the_dense_losses(tiny_coco, caches, gamma):
    dense, sparse = caches
    keys = [(0, 0), (3, 1), (5, 0), (7, 1)]  # mixed views and canvases
    cfg = LossConfig(vlr_gamma=gamma)
    a, b = cache_losses(tiny_coco, dense, cfg, keys), cache_losses(tiny_coco, sparse, cfg, keys)
    for key in ("loss_ld", "loss_ld_vlr", "loss_kd", "loss"):
        assert float(a[key].detach()) != 0.0
        assert float(b[key].detach()) == float(a[key].detach()), key  # the same stored values, bit for bit


def test_sparse_cache_refuses_what_it_cannot_serve(tiny_coco, caches, tmp_path):
    _, sparse = caches
    with pytest.raises(UserError, match="gamma >= 0.25 only"):
        cache_losses(tiny_coco, sparse, LossConfig(vlr_gamma=0.1), [(0, 0)])
    with pytest.raises(UserError, match="--vlr-iou official"):
        cache_losses(tiny_coco, sparse, LossConfig(vlr_iou="diou"), [(0, 0)])
    # Without a VLR term any gamma is fine: nothing reads those rows.
    cache_losses(tiny_coco, sparse, LossConfig(vlr_gamma=0.1, vlr_weight=0), [(0, 0)])
    proc = run_cli("train-student", "--cache", sparse.location, "--images", tiny_coco["images"], "--ann",
                   tiny_coco["ann"], "--out", tmp_path / "s", "--vlr-gamma", "0", "--workers", "0")
    assert_user_error(proc, "--vlr-gamma 0.0 needs more rows")
