"""The criterion's distillation terms against mmdetection's LD head."""

import math

import pytest

from detector.atss import assign_batch
from detector.gfl_loss import gfl_losses
from detector.rows import flatten_rows
from detector.views import level_sizes
from distill.config import LossConfig
from distill.criterion import distillation_losses


def test_main_ld_matches_mmdet_ld_head(mmdet_fixture):
    """mmdet's LDHead (Main LD only, official normalisation) on the same student and teacher maps."""
    case = mmdet_fixture["cases"]["r18_small"]
    pads = [(math.ceil(h / 32) * 32, math.ceil(w / 32) * 32) for h, w in case["image_shapes"]]
    level_hw = [level_sizes(p, (8, 16, 32, 64, 128)) for p in pads]
    assign = assign_batch(level_hw, case["gt_boxes"], case["gt_labels"], (8, 16, 32, 64, 128), 5)
    cls_rows, box_rows = flatten_rows(case["cls_scores"], level_hw), flatten_rows(case["bbox_preds"], level_hw)
    teacher_box = flatten_rows(case["teacher_box"], level_hw)
    gfl = gfl_losses(cls_rows, box_rows, assign, 16)
    cfg = LossConfig(vlr_weight=0, kd_weight=0, ld_normalization="official")
    terms = distillation_losses(cls_rows, box_rows, teacher_box, None, assign, gfl, cfg, 16)
    # mmdet's value carries its loss weight 0.25.
    assert float(cfg.ld_weight * terms["loss_ld"]) == pytest.approx(case["ld_losses"]["loss_ld"], rel=1e-5)
    mean = distillation_losses(cls_rows, box_rows, teacher_box, None, assign, gfl,
                               LossConfig(vlr_weight=0, kd_weight=0, ld_normalization="mean"), 16)
    # "mean" = official / the GIoU weight sum.
    assert float(mean["loss_ld"]) == pytest.approx(float(terms["loss_ld"] / gfl.weight_sum), rel=1e-6)
