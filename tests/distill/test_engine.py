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


def test_a_val_set_whose_categories_differ_is_refused_before_training(tiny_coco, tmp_path):
    """Labels are indices into the training annotations' categories: a validation file listing other
    ids would have every class scored as another one. Refused before the run folder exists."""
    val = json.loads(tiny_coco["val_ann"].read_text())
    val["categories"] = [{"id": 0, "name": "zebra"}, *val["categories"]]  # one more id, sorting first
    other = tmp_path / "val.json"
    other.write_text(json.dumps(val))
    data = DataConfig(images=str(tiny_coco["images"]), ann=str(tiny_coco["ann"]), img_scale=(96, 96),
                      val_images=str(tiny_coco["val_images"]), val_ann=str(other))
    with pytest.raises(UserError, match=r"validation annotations .* only in validation: \[0\]"):
        run_train(data, ModelConfig(num_classes=5, **TINY_MODEL), TrainConfig(max_iters=1, batch_size=4, workers=0),
                  LossConfig(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_logs_its_evaluation_once(tiny_coco, tmp_path):
    _train(tiny_coco, tmp_path / "run", val=True, eval_every=1)
    _train(tiny_coco, tmp_path / "run", val=True, eval_every=1, resume=True)  # nothing left to train: evaluates
    lines = _losses(tmp_path / "run")
    assert [r["iter"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["iter"] for r in lines if "AP" in r] == [3, 6]  # the curve's point and one final evaluation


def test_a_record_cut_short_by_a_kill_does_not_stop_the_resume(tiny_coco, tmp_path):
    _train(tiny_coco, tmp_path / "run", max_iters=3)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"iter": 4, "epo')  # killed while writing the record of step 4 (after the checkpoint of step 3)
    _train(tiny_coco, tmp_path / "run", resume=True)
    assert [r["iter"] for r in _losses(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_an_unreadable_image_mid_run_keeps_the_steps_since_the_checkpoint(tiny_coco, tmp_path, monkeypatch):
    from data.coco import CocoDetection

    _train(tiny_coco, tmp_path / "straight")
    _train(tiny_coco, tmp_path / "run", max_iters=3)  # epoch 1, checkpointed at its end
    real_load, calls = CocoDetection.load_image, []

    def load_image(self, index):
        calls.append(index)
        if len(calls) > 4:  # the second batch of epoch 2: one step after the checkpoint
            raise UserError("image file x.png cannot be read; replace it")
        return real_load(self, index)

    monkeypatch.setattr(CocoDetection, "load_image", load_image)
    with pytest.raises(UserError, match="cannot be read"):
        _train(tiny_coco, tmp_path / "run", resume=True)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["iter"] == 4
    monkeypatch.setattr(CocoDetection, "load_image", real_load)  # the image replaced: the run goes on
    _train(tiny_coco, tmp_path / "run", resume=True)
    split, straight = _losses(tmp_path / "run"), _losses(tmp_path / "straight")
    assert [r["iter"] for r in split] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in straight], rel=1e-6)


def test_a_run_killed_during_an_evaluation_evaluates_on_resume(tiny_coco, tmp_path, monkeypatch):
    """The epoch's checkpoint is written before its --eval-every evaluation: a run stopped during that
    evaluation resumes after it, and the AP curve would lack the point."""
    import distill.engine

    real = distill.engine.evaluate_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill.engine, "evaluate_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_coco, tmp_path / "run", val=True, eval_every=1)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["iter"] == 3
    monkeypatch.setattr(distill.engine, "evaluate_model", real)
    _train(tiny_coco, tmp_path / "run", val=True, eval_every=1, resume=True)
    lines = _losses(tmp_path / "run")
    assert [(r["iter"], r["epoch"]) for r in lines if "AP" in r] == [(3, 1), (6, 2)]
    _train(tiny_coco, tmp_path / "run", val=True, eval_every=1, resume=True)  # finished: only the final one again
    assert [r["iter"] for r in _losses(tmp_path / "run") if "AP" in r] == [3, 6]


def test_a_resumed_run_keeps_its_loss_scale(tiny_coco, tmp_path, monkeypatch):
    """fp16 on CUDA trains under a GradScaler whose scale grows during the run: a resumed run starts
    from the scale it had reached, not the initial one (which skips steps until it has backed off).
    A CPU scaler stands in for CUDA's here."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real("cpu", init_scale=4.0,
                                                                              growth_interval=1))
    _train(tiny_coco, tmp_path / "run", max_iters=3)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"] == 32.0
    _train(tiny_coco, tmp_path / "run", resume=True)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"] == 256.0


def test_a_kill_while_eval_json_is_written_leaves_no_half_file(tiny_coco, tmp_path, monkeypatch):
    """eval.json marks a finished run (a sweep skips the point, the demo the step, and both read it):
    a kill mid-write must not leave half of one, which would be read as finished and fail to parse."""
    from pathlib import Path

    real = Path.write_text

    def killed(self, text, *args, **kwargs):
        if self.name.startswith("eval.json"):
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_coco, tmp_path / "run", val=True, max_iters=1)
    assert not (tmp_path / "run" / "eval.json").exists()
    monkeypatch.setattr(Path, "write_text", real)
    _train(tiny_coco, tmp_path / "run", val=True, max_iters=1, resume=True)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["iter"] == 1
