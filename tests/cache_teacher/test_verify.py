"""The teacher's AP read from the cache alone equals `evaluate` of that teacher on the same images."""

import json

import pytest

from cache_teacher.reader import CacheReader
from cache_teacher.verify import dataset_of_cache, format_verify, teacher_ap, verify
from data.config import DataConfig
from detector import ModelConfig
from detector.inference import EvalConfig, run_evaluate
from distill.config import LossConfig, TrainConfig
from distill.engine import run_train
from tests.conftest import TINY_MODEL, dump_tiny_cache


@pytest.fixture(scope="module")
def trained(tiny_coco, tmp_path_factory):
    """A tiny teacher overfitted on the tiny training images for a few seconds: it finds objects."""
    root = tmp_path_factory.mktemp("trained")
    data = DataConfig(images=str(tiny_coco["images"]), ann=str(tiny_coco["ann"]), img_scale=(96, 96), views="orig")
    train = TrainConfig(epochs=40, batch_size=10, workers=0, log_every=20, warmup_iters=5, lr=0.02, optimizer="sgd",
                        lr_steps=(100,))
    run_train(data, ModelConfig(num_classes=5, **TINY_MODEL), train, LossConfig(), root / "run", progress=False)
    checkpoint = root / "run" / "checkpoints" / "last.pt"
    return checkpoint, CacheReader(dump_tiny_cache(tiny_coco, checkpoint, root / "cache.zarr"))


def test_teacher_ap_from_the_cache_equals_evaluate_of_the_teacher(tiny_coco, trained, tmp_path):
    checkpoint, cache = trained
    from_cache = teacher_ap(cache, dataset_of_cache(cache, None, None))
    data = DataConfig(images=str(tiny_coco["images"]), ann=str(tiny_coco["ann"]), img_scale=(96, 96))
    result = run_evaluate(EvalConfig(checkpoint=str(checkpoint), data=data, workers=0, out=str(tmp_path / "res.json")),
                          progress=False)
    assert from_cache["images"] == result["images"] == 10
    assert result["metrics"]["AP50"] > 0.05  # the teacher finds something: the comparison means something
    for key in ("AP", "AP50", "AP75"):  # equal up to the fp16 rounding of the cached logits
        assert from_cache["metrics"][key] == pytest.approx(result["metrics"][key], abs=0.005), key
    detections = json.loads((tmp_path / "res.json").read_text())
    assert len(detections) > 0


def test_verify_reports_the_teacher_ap_and_an_untrained_teacher_is_noted(tiny_cache, trained):
    _, cache = trained
    report = verify(cache)
    assert report["ok"] and report["teacher_ap"]["metrics"]["AP50"] > 0.05
    assert "teacher AP from the cache" in format_verify(report)
    untrained = verify(CacheReader(tiny_cache))  # the session's random teacher
    assert untrained["teacher_ap"]["metrics"]["AP50"] < 0.01 and "finds almost nothing" in format_verify(untrained)
