"""Our GFL against mmdetection 3.3.0, through the committed golden fixtures
(tools/make_mmdet_fixtures.py). mmdetection itself is not needed here."""

import json
import math

import pytest
import torch

from core.errors import UserError
from data.views import ViewRecord, level_sizes
from detector import ModelConfig, build_detector, load_checkpoint
from detector.atss import assign_batch
from detector.checkpoint import infer_model_config
from detector.gfl_loss import gfl_losses
from detector.postprocess import postprocess
from detector.rows import flatten_rows
from tests.conftest import FIXTURES

STRIDES = (8, 16, 32, 64, 128)
CASES = ["r18_small", "r50_small"]


def _own_level_hw(case):
    # mmdet's valid flags cover ceil(pad / stride) locations of each image's own padded size.
    pads = [(math.ceil(h / 32) * 32, math.ceil(w / 32) * 32) for h, w in case["image_shapes"]]
    return [level_sizes(p, STRIDES) for p in pads], pads


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_state_dict_keys_and_shapes_match_mmdet(depth):
    expected = json.loads((FIXTURES / "mmdet_gfl_keys.json").read_text())[str(depth)]
    ours = [[k, list(v.shape)] for k, v in build_detector(ModelConfig(depth=depth)).state_dict().items()]
    # Same names, same shapes, same order: an mmdet GFL checkpoint loads with strict=True.
    assert ours == expected


@pytest.mark.parametrize("name", CASES)
def test_head_outputs_match_mmdet(name, mmdet_fixture, tmp_path):
    case = mmdet_fixture["cases"][name]
    model = build_detector(ModelConfig(**case["model_config"]))
    path = tmp_path / "mmdet.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": case["state_dict"]}, path)
    load_checkpoint(model, path)  # mmdet checkpoint layout, strict
    model.train()  # the fixture's outputs come from mmdet's training graph (BN frozen by norm_eval)
    with torch.no_grad():
        cls_out, box_out = model(case["images"])
    for ours, theirs in zip(cls_out + box_out, case["cls_scores"] + case["bbox_preds"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_atss_assignment_matches_mmdet(name, mmdet_fixture):
    case = mmdet_fixture["cases"][name]
    level_hw, _ = _own_level_hw(case)
    assign = assign_batch(level_hw, case["gt_boxes"], case["gt_labels"], STRIDES, case["model_config"]["num_classes"])
    per_image = torch.split(torch.full((assign.num_rows,), -1), assign.rows_per_image)
    start = 0
    for i, expected in enumerate(case["assigned_gt_inds"]):
        n = assign.rows_per_image[i]
        ours = torch.full((n,), 0, dtype=torch.long)
        pos_i = assign.pos[(assign.pos >= start) & (assign.pos < start + n)] - start
        # mmdet numbers GTs from 1 (0 = negative); recover our GT index through the assigned box.
        gt = case["gt_boxes"][i]
        for row, box in zip(pos_i, assign.pos_gt_boxes[(assign.pos >= start) & (assign.pos < start + n)]):
            ours[row] = int((gt == box).all(dim=1).nonzero()[0]) + 1
        assert len(per_image[i]) == expected.numel()  # same valid anchors per image
        assert torch.equal(ours, expected)  # identical positives, identical GT per positive
        start += n
    assert assign.pos.numel() > 10  # the case does exercise the assigner


@pytest.mark.parametrize("name", CASES)
def test_gfl_losses_match_mmdet(name, mmdet_fixture):
    case = mmdet_fixture["cases"][name]
    level_hw, _ = _own_level_hw(case)
    cfg = case["model_config"]
    assign = assign_batch(level_hw, case["gt_boxes"], case["gt_labels"], STRIDES, cfg["num_classes"])
    out = gfl_losses(flatten_rows(case["cls_scores"], level_hw), flatten_rows(case["bbox_preds"], level_hw), assign, 16)
    expected = case["losses"]
    # mmdet's values carry their loss weights (QFL 1, GIoU 2, DFL 0.25); ours are unweighted.
    assert float(out.losses["loss_qfl"]) == pytest.approx(expected["loss_cls"], rel=1e-5)
    assert float(2.0 * out.losses["loss_giou"]) == pytest.approx(expected["loss_bbox"], rel=1e-5)
    assert float(0.25 * out.losses["loss_dfl"]) == pytest.approx(expected["loss_dfl"], rel=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_postprocess_matches_mmdet(name, mmdet_fixture):
    case = mmdet_fixture["cases"][name]
    level_hw, pads = _own_level_hw(case)
    records = [
        ViewRecord(image_id=i, flip=False, img_scale=(max(hw), min(hw)), orig_hw=tuple(hw), resized_hw=tuple(hw),
                   padded_hw=pad, level_hw=lv)
        for i, (hw, pad, lv) in enumerate(zip(case["image_shapes"], pads, level_hw))
    ]
    dets = postprocess(case["cls_scores"], case["bbox_preds"], records, STRIDES, 16)
    for ours, theirs in zip(dets, case["detections"]):
        assert len(theirs["scores"]) > 10  # the fixture has real detections to compare
        assert ours.scores.shape == theirs["scores"].shape
        torch.testing.assert_close(ours.scores, theirs["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.boxes, theirs["boxes"], rtol=1e-5, atol=1e-4)
        assert torch.equal(ours.labels, theirs["labels"])


@pytest.mark.parametrize("name", CASES)
def test_architecture_is_inferred_from_mmdet_weights(name, mmdet_fixture):
    case = mmdet_fixture["cases"][name]
    cfg = dict(case["model_config"])
    inferred = infer_model_config(case["state_dict"], gn_groups=cfg["gn_groups"])
    assert inferred == ModelConfig(**cfg)


def test_checkpoint_of_another_architecture_is_refused(mmdet_fixture, tmp_path):
    case = mmdet_fixture["cases"]["r18_small"]
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": case["state_dict"]}, path)
    cfg = dict(case["model_config"], depth=50)
    with pytest.raises(UserError) as err:
        load_checkpoint(build_detector(ModelConfig(**cfg)), path)
    message = str(err.value)
    assert "\n" not in message  # one line for the CLI
    # R-18's names are a subset of R-50's, so the error lists what R-50 misses (bottleneck conv3).
    assert "missing keys" in message and "conv3" in message and "shape mismatches" in message
