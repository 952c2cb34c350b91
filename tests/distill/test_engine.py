import importlib.util
import json
import time

import pytest
import torch

from core.errors import UserError
from data.config import DataConfig
from detector import ModelConfig, build_detector, load_checkpoint
from distill.config import LossConfig, TrainConfig
from distill.engine import lr_at, run_train
from tests.conftest import TINY_MODEL


def _data(tiny, val=True, views="orig,hflip"):
    kw = dict(val_images=str(tiny["val_images"]), val_ann=str(tiny["val_ann"])) if val else {}
    return DataConfig(images=str(tiny["images"]), ann=str(tiny["ann"]), img_scale=(96, 96), views=views, **kw)


def _train(tiny, out, resume=False, val=False, views="orig,hflip", **train_kw):
    cfg = dict(epochs=2, batch_size=4, workers=0, log_every=1, warmup_iters=2, lr=0.01)
    cfg.update(train_kw)
    return run_train(
        _data(tiny, val, views),
        ModelConfig(num_classes=5, **TINY_MODEL),
        TrainConfig(**cfg),
        LossConfig(),
        out,
        resume=resume,
        progress=False,
    )


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_steps():
    cfg = TrainConfig(epochs=12, warmup_iters=500, warmup_ratio=0.001)
    assert lr_at(cfg, 0.01, 0, 0) == pytest.approx(1e-5)  # warm-up starts at 0.001 x lr
    assert lr_at(cfg, 0.01, 250, 0) == pytest.approx(0.01 * (0.001 + 0.999 * 0.5))
    assert lr_at(cfg, 0.01, 600, 7) == pytest.approx(0.01)
    assert lr_at(cfg, 0.01, 600, 8) == pytest.approx(0.001)  # 1x schedule: x0.1 from epoch 8 (0-based)
    assert lr_at(cfg, 0.01, 600, 11) == pytest.approx(0.0001)
    assert TrainConfig(epochs=24).resolved_lr_steps() == (16, 22)  # the 2x schedule's steps
    assert TrainConfig(batch_size=4).base_lr() == pytest.approx(0.0025)  # linear scaling from 16 images


def test_training_run_writes_metrics_checkpoint_and_evaluation(tiny_coco, tmp_path):
    result = _train(tiny_coco, tmp_path / "run", val=True, eval_every=1)
    lines = _losses(tmp_path / "run")
    records = [r for r in lines if "loss" in r]
    assert [r["iter"] for r in records] == [1, 2, 3, 4, 5, 6]  # 10 images / batch 4 -> 3 steps x 2 epochs
    # AP curve: after epoch 1 (eval_every=1) and at the end.
    assert [(r["iter"], r["epoch"]) for r in lines if "AP" in r] == [(3, 1), (6, 2)]
    assert {"iter", "lr", "loss_qfl", "loss_giou", "loss_dfl", "loss"} <= set(records[0])
    for r in records:  # "loss" is the sum of the weighted terms
        assert r["loss"] == pytest.approx(r["loss_qfl"] + r["loss_giou"] + r["loss_dfl"], rel=1e-5)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["depth"] == 18 and config["train"]["lr"] == 0.01
    model = build_detector(ModelConfig(num_classes=5, **TINY_MODEL))
    ckpt = load_checkpoint(model, tmp_path / "run" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["iter"]) == (2, 6)
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(evaluation["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert result["metrics"] == evaluation["metrics"]


def test_same_seed_same_losses_whatever_the_workers(tiny_coco, tmp_path):
    _train(tiny_coco, tmp_path / "a", max_iters=3, workers=0)
    _train(tiny_coco, tmp_path / "b", max_iters=3, workers=2)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise: batches and init are seeded


def test_resume_continues_exactly_where_it_stopped(tiny_coco, tmp_path):
    _train(tiny_coco, tmp_path / "straight")
    _train(tiny_coco, tmp_path / "split", max_iters=4)  # stops inside epoch 2
    _train(tiny_coco, tmp_path / "split", resume=True)
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert [r["iter"] for r in split] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in straight], rel=1e-6)
    w1 = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    w2 = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-6) for k in w1)


def test_a_run_saved_before_the_backbone_field_resumes(tiny_coco, tmp_path):
    _train(tiny_coco, tmp_path / "run", max_iters=1)
    config_path = tmp_path / "run" / "config.json"
    config = json.loads(config_path.read_text())
    del config["model"]["backbone"]  # what a run folder made before --backbone holds
    config_path.write_text(json.dumps(config))
    _train(tiny_coco, tmp_path / "run", resume=True, max_iters=2)  # the missing key is the default, resnet
    assert [r["iter"] for r in _losses(tmp_path / "run")] == [1, 2]


def test_existing_run_is_not_overwritten(tiny_coco, tmp_path):
    _train(tiny_coco, tmp_path / "run", max_iters=1)
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(UserError, match="--resume"):
        _train(tiny_coco, tmp_path / "run", max_iters=1)
    with pytest.raises(UserError, match="configuration differs.*lr"):
        _train(tiny_coco, tmp_path / "run", resume=True, lr=0.02)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before  # nothing lost


def test_loss_falls_when_overfitting_one_batch(tiny_coco, tmp_path):
    # One batch of all 10 images, one view: every step sees the same input, so the loss must fall.
    _train(tiny_coco, tmp_path / "run", views="orig", batch_size=10, epochs=30, lr=0.02, warmup_iters=3,
           lr_steps=(100,))
    losses = [r["loss"] for r in _losses(tmp_path / "run")]
    assert losses[-1] < 0.8 * losses[0]
    assert min(losses[-5:]) <= min(losses[:25])  # still improving at the end, not a lucky dip


# The tensorboard extra is optional: without it scalars go to metrics.jsonl only (tested above).
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="the tensorboard extra is not installed: pip install "
                                              "'ldcache[tensorboard]' (make setup installs it)")


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@needs_tensorboard
def test_tensorboard_events_hold_the_scalars_of_metrics_jsonl(tiny_coco, tmp_path):
    _train(tiny_coco, tmp_path / "run", val=True, eval_every=1)
    records = _losses(tmp_path / "run")
    scalars = _scalars(tmp_path / "run")
    expected: dict[str, list] = {}
    for r in records:
        for key, value in r.items():
            if key not in ("iter", "epoch"):
                expected.setdefault(key, []).append((r["iter"], value))
    assert {"loss", "loss_giou", "lr", "AP", "AP50", "steps_per_s", "data_wait_ms"} <= set(expected)
    assert set(scalars) == set(expected)
    for key, points in expected.items():
        assert [s for s, _ in scalars[key]] == [s for s, _ in points], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in points], rel=1e-6), key


@needs_tensorboard
def test_a_resumed_run_logs_each_step_once_to_tensorboard_and_none_without_it(tiny_coco, tmp_path):
    _train(tiny_coco, tmp_path / "split", max_iters=4)
    # Event files sort by their names: creation second, host, pid, then a per-process counter that
    # sorts "10" before "9". A real resume starts seconds later; these tiny runs can share a second.
    time.sleep(1.1)
    _train(tiny_coco, tmp_path / "split", resume=True)
    steps = [s for s, _ in _scalars(tmp_path / "split")["loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]
    _train(tiny_coco, tmp_path / "plain", max_iters=2, tensorboard=False)
    assert not (tmp_path / "plain" / "tensorboard").exists()
