"""The criterion's distillation terms against mmdetection's LD head."""

import math

import pytest

from data.views import level_sizes
from detector.atss import assign_batch
from detector.gfl_loss import gfl_losses
from detector.rows import flatten_rows
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


STRIDES = (8, 16, 32, 64, 128)


def _batch(num_images: int, num_classes: int, seed: int = 0, repeat: int = 1):
    """Random student maps, teacher rows and GT for images of one 128x160 canvas; `repeat` tiles
    the same images that many times (a batch doubled by repeating its images)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    level_hw = level_sizes((128, 160), STRIDES)
    cls = [torch.randn(num_images, num_classes, h, w, generator=g) - 2 for h, w in level_hw]
    box = [torch.randn(num_images, 68, h, w, generator=g) for h, w in level_hw]
    gts, labels = [], []
    for _ in range(num_images):
        k = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([120.0, 90.0])
        wh = 8 + torch.rand(k, 2, generator=g) * 60
        gts.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(num_classes, (k,), generator=g))
    rows = sum(h * w for h, w in level_hw)
    teacher = (
        torch.randn(num_images * rows, 68, generator=g) * 3,
        torch.randn(num_images * rows, num_classes, generator=g),
    )
    tile = lambda maps: [torch.cat([m] * repeat) for m in maps]  # noqa: E731
    return (tile(cls), tile(box), [level_hw] * (num_images * repeat), gts * repeat, labels * repeat,
            (torch.cat([teacher[0]] * repeat), torch.cat([teacher[1]] * repeat)))


def _terms(cfg, num_classes, batch):
    from distill.criterion import compute_losses

    cls, box, level_hw, gts, labels, teacher = batch
    out = compute_losses(cls, box, level_hw, gts, labels, cfg, num_classes, 16, STRIDES, teacher_rows=teacher)
    return {k: float(out[k]) for k in ("loss_ld", "loss_ld_vlr", "loss_kd", "loss_giou", "loss_qfl")}


OFFICIAL = LossConfig(ld_normalization="official", kd_normalization="official")


def test_defaults_equal_the_official_losses_at_the_papers_setting():
    """2 images per process and 80 classes: the paper's setting, where its weights were tuned."""
    batch = _batch(2, 80)
    default, official = _terms(LossConfig(), 80, batch), _terms(OFFICIAL, 80, batch)
    for key in ("loss_ld", "loss_ld_vlr", "loss_kd"):
        assert default[key] > 0 and default[key] == pytest.approx(official[key], rel=1e-6), key


def test_defaults_do_not_change_when_a_batch_is_doubled_by_repeating_its_images():
    one, two = _batch(3, 6), _batch(3, 6, repeat=2)
    default_one, default_two = _terms(LossConfig(), 6, one), _terms(LossConfig(), 6, two)
    for key in ("loss_ld", "loss_ld_vlr", "loss_kd", "loss_giou", "loss_qfl"):
        assert default_two[key] == pytest.approx(default_one[key], rel=1e-5), key
    # ...whereas the official sums double (and a 6-class KD mean is 80/6 x the default).
    official_one, official_two = _terms(OFFICIAL, 6, one), _terms(OFFICIAL, 6, two)
    assert official_two["loss_ld"] == pytest.approx(2 * official_one["loss_ld"], rel=1e-5)
    assert official_two["loss_ld_vlr"] == pytest.approx(2 * official_one["loss_ld_vlr"], rel=1e-5)
    assert official_one["loss_kd"] == pytest.approx(default_one["loss_kd"] * 80 / 6, rel=1e-5)
    # per positive: invariant to the batch too
    positive = LossConfig(ld_normalization="positive")
    assert _terms(positive, 6, two)["loss_ld"] == pytest.approx(_terms(positive, 6, one)["loss_ld"], rel=1e-5)


def test_one_class_data_gets_no_main_kd_by_default_and_the_sigmoid_kd_is_not_constant():
    batch = _batch(2, 1)
    assert LossConfig().for_classes(1).kd_weight == 0.0 and LossConfig().for_classes(6).kd_weight == 10.0
    assert LossConfig().for_classes(1).teacher_needs().class_logits is False  # nothing read for it
    assert _terms(LossConfig(), 1, batch)["loss_kd"] == 0.0  # auto: off, never a silent constant term
    sigmoid = LossConfig(kd_mode="sigmoid")
    assert sigmoid.for_classes(1) is sigmoid and _terms(sigmoid, 1, batch)["loss_kd"] > 0  # chosen: it has signal
    assert _terms(LossConfig(kd_mode="softmax"), 1, batch)["loss_kd"] == 0.0  # a softmax over one class
    assert "constant" in " ".join(LossConfig(kd_mode="softmax").strength_warnings(2, 1))


def test_recipes_and_warnings():
    mmdet, none = LossConfig(recipe="mmdet"), LossConfig(recipe="none")
    assert (mmdet.ld_weight, mmdet.vlr_weight, mmdet.kd_weight) == (0.25, 0.0, 0.0)
    assert mmdet.ld_normalization == "official" and mmdet.weight_sum_clamp is False
    assert not none.distills and LossConfig().distills
    assert LossConfig(recipe="mmdet", vlr_weight=0.1).vlr_weight == 0.1  # a flag wins over its recipe
    assert LossConfig().strength_warnings(16, 6) == []  # the defaults are the paper's strength anywhere
    text = " ".join(OFFICIAL.strength_warnings(8, 6))
    assert "4.0x the paper's strength" in text and "13.3x its strength" in text


def test_unclamped_weight_sum_divides_by_the_bare_sum_as_mmdetection_ld_head():
    cls, box, level_hw, gts, labels, teacher = _batch(2, 6)
    cls = [c - 6 for c in cls]  # an untrained student: scores ~0.002, so the weight sum is below 1
    batch = (cls, box, level_hw, gts, labels, teacher)
    clamped = _terms(LossConfig(), 6, batch)["loss_giou"]
    bare = _terms(LossConfig(weight_sum_clamp=False), 6, batch)["loss_giou"]
    assert bare > 10 * clamped  # divided by a weight sum far below the clamp at 1
