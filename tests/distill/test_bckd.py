"""BCKD's two terms: each equals a direct element-wise computation (with the gradient on the
factors BCKD's authors give it), both vanish when the student is the teacher, they do not change
when a batch repeats its images, and the cache serves the same losses as the teacher run online."""

import math

import pytest
import torch

from cache_teacher.reader import CacheReader
from cache_teacher.targets import CachedTeacher
from data.coco import CocoDetection
from detector import ModelConfig, build_detector
from detector.atss import assign_batch
from distill.config import LossConfig
from distill.criterion import compute_losses
from distill.losses import bckd_box_weights, bckd_cls_loss
from distill.teachers import OnlineTeacher
from tests.conftest import TINY_MODEL, equal_canvas_keys

BCKD = LossConfig(recipe="bckd")
STRIDES = (8, 16, 32, 64, 128)


def test_classification_term_equals_the_element_wise_formula_and_its_gradient():
    torch.manual_seed(0)
    s = (torch.randn(7, 5) * 3).requires_grad_()
    t = (torch.randn(7, 5) * 3).requires_grad_()
    got = bckd_cls_loss(s, t)
    expected = torch.zeros(7)
    for i in range(7):
        for c in range(5):
            p, q = 1 / (1 + math.exp(-t[i, c].item())), torch.sigmoid(s[i, c])
            bce = -(p * torch.log(q) + (1 - p) * torch.log(1 - q))
            expected[i] = expected[i] + bce * (p - q).abs()  # |p - q| keeps q's gradient (QFL-like)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The modulating factor carries gradient: d/ds of bce * |p - q| has the factor's part too.
    grad, = torch.autograd.grad(got.sum(), s, retain_graph=True)
    p, q = torch.sigmoid(t.detach()), torch.sigmoid(s.detach())
    bce = torch.nn.functional.binary_cross_entropy_with_logits(s.detach(), p, reduction="none")
    d_bce = q - p  # d/ds BCE(s, p)
    d_factor = -torch.sign(p - q) * q * (1 - q)  # d/ds |p - sigmoid(s)|
    assert torch.allclose(grad, d_bce * (p - q).abs() + bce * d_factor, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grad, d_bce * (p - q).abs(), rtol=1e-3)  # a detached factor differs
    # The teacher's probability is a target: no gradient reaches its logits.
    assert torch.autograd.grad(got.sum(), t, allow_unused=True)[0] is None


def test_box_weights_are_the_largest_class_disagreement_without_gradient():
    torch.manual_seed(1)
    s, t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    w = bckd_box_weights(s, t)
    expected = [max(abs(torch.sigmoid(t[i, c]).item() - torch.sigmoid(s[i, c]).item()) for c in range(4))
                for i in range(6)]
    assert w.tolist() == pytest.approx(expected, abs=1e-6)
    assert not w.requires_grad


def _giou(a, b):
    """Generalised IoU of two boxes (x1, y1, x2, y2), written out."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclose - union) / enclose


def _batch(num_classes=3, hws=((64, 64), (64, 96))):
    torch.manual_seed(2)
    level_hw = [tuple((math.ceil(h / s), math.ceil(w / s)) for s in STRIDES) for h, w in hws]
    n = sum(h * w for hw in level_hw for h, w in hw)
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 60.0, 30.0]]), torch.tensor([[10.0, 8.0, 80.0, 60.0]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    student_cls, teacher_cls = torch.randn(n, num_classes) * 2, torch.randn(n, num_classes) * 2
    student_box, teacher_box = torch.randn(n, 4 * 17) * 2, torch.randn(n, 4 * 17) * 2
    return level_hw, boxes, labels, student_cls, student_box, teacher_cls, teacher_box


def _as_maps(rows, level_hw):
    """Rows of detector.rows back to per-level maps [B, K, H, W] (each image's own locations)."""
    maps, start = [], 0
    for level in range(len(STRIDES)):
        h = max(hw[level][0] for hw in level_hw)
        w = max(hw[level][1] for hw in level_hw)
        maps.append(torch.zeros(len(level_hw), rows.shape[1], h, w))
    for b, hws in enumerate(level_hw):
        for level, (h, w) in enumerate(hws):
            maps[level][b, :, :h, :w] = rows[start:start + h * w].T.reshape(-1, h, w)
            start += h * w
    return maps


def _losses(cfg, level_hw, boxes, labels, s_cls, s_box, t_cls, t_box):
    return compute_losses(_as_maps(s_cls, level_hw), _as_maps(s_box, level_hw), level_hw, boxes, labels, cfg,
                          s_cls.shape[1], 16, STRIDES, teacher_rows=(t_box, t_cls))


def test_box_term_equals_the_element_wise_formula():
    level_hw, boxes, labels, s_cls, s_box, t_cls, t_box = _batch()
    got = _losses(BCKD, level_hw, boxes, labels, s_cls, s_box, t_cls, t_box)
    assign = assign_batch(level_hw, boxes, labels, STRIDES, 3)
    # QFL's normaliser: at least one positive per image (mmdetection's count).
    num_pos = sum(max(1, int((assign.images[assign.pos] == b).sum())) for b in range(len(level_hw)))
    bins = torch.arange(17.0)
    total = 0.0
    for i in range(s_cls.shape[0]):
        stride = assign.strides[i].item()
        cx = (assign.anchors[i, 0] + assign.anchors[i, 2]).item() / 2 / stride
        cy = (assign.anchors[i, 1] + assign.anchors[i, 3]).item() / 2 / stride
        ds = (s_box[i].reshape(4, 17).softmax(-1) * bins).sum(-1).tolist()
        dt = (t_box[i].reshape(4, 17).softmax(-1) * bins).sum(-1).tolist()
        student = (cx - ds[0], cy - ds[1], cx + ds[2], cy + ds[3])
        teacher = (cx - dt[0], cy - dt[1], cx + dt[2], cy + dt[3])
        weight = (torch.sigmoid(t_cls[i]) - torch.sigmoid(s_cls[i])).abs().max().item()
        total += weight * (1 - _giou(student, teacher))
    assert got["loss_bckd_box"].item() == pytest.approx(4.0 * total / num_pos, rel=1e-4)
    cls_total = bckd_cls_loss(s_cls, t_cls).sum().item()
    assert got["loss_bckd_cls"].item() == pytest.approx(1.0 * cls_total / num_pos, rel=1e-5)
    # The student's box keeps its gradient, the teacher's has none.
    s_box = s_box.clone().requires_grad_()
    t_box = t_box.clone().requires_grad_()
    loss = _losses(LossConfig(recipe="bckd", bckd_cls_weight=0.0), level_hw, boxes, labels, s_cls, s_box, t_cls,
                   t_box)["loss_bckd_box"]
    grads = torch.autograd.grad(loss, [s_box, t_box], allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1] is None


def test_both_terms_vanish_when_the_student_is_the_teacher():
    level_hw, boxes, labels, s_cls, s_box, _, _ = _batch()
    got = _losses(BCKD, level_hw, boxes, labels, s_cls, s_box, s_cls.clone(), s_box.clone())
    assert got["loss_bckd_cls"].item() == 0.0 and got["loss_bckd_box"].item() == 0.0
    assert got["loss_qfl"].item() > 0  # the task losses are still there


def test_a_batch_of_repeated_images_gives_the_same_losses():
    """Sums over locations divided by the positives: twice the images, twice both."""
    level_hw, boxes, labels, s_cls, s_box, t_cls, t_box = _batch()
    once = _losses(BCKD, level_hw, boxes, labels, s_cls, s_box, t_cls, t_box)
    n0 = sum(h * w for h, w in level_hw[0])
    split = lambda x: (x[:n0], x[n0:])  # noqa: E731
    twice = [torch.cat([*split(x), *split(x)]) for x in (s_cls, s_box, t_cls, t_box)]
    again = _losses(BCKD, level_hw * 2, boxes * 2, labels * 2, *twice)
    for key in ("loss_bckd_cls", "loss_bckd_box"):
        assert again[key].item() == pytest.approx(once[key].item(), rel=1e-5), key


def test_cache_and_online_teacher_give_the_same_bckd_losses(tiny_coco, tiny_teacher, tiny_cache):
    cache = CacheReader(tiny_cache)
    dataset = CocoDetection(tiny_coco["images"], tiny_coco["ann"], views=cache.specs, train=True)
    keys = equal_canvas_keys(dataset, cache)  # the live teacher sees each view as the dump did
    offline, online = CachedTeacher(cache), OnlineTeacher(tiny_teacher["model"], tiny_teacher["config"], "x")
    batch, stored = offline.collate([offline.dataset(dataset, BCKD.teacher_needs())[k] for k in keys])
    torch.manual_seed(0)
    student = build_detector(ModelConfig(num_classes=5, **TINY_MODEL)).train()
    cls_out, box_out = student(batch.images)
    args = ([r.level_hw for r in batch.records], batch.boxes, batch.labels, BCKD, 5, 16, STRIDES)
    from_cache = compute_losses(cls_out, box_out, *args, teacher_rows=offline.rows(batch, stored, torch.device("cpu")))
    from_live = compute_losses(cls_out, box_out, *args, teacher_rows=online.rows(batch, None, torch.device("cpu")))
    for key in ("loss_bckd_cls", "loss_bckd_box"):
        live, cached = float(from_live[key].detach()), float(from_cache[key].detach())
        assert live > 0
        assert cached == pytest.approx(live, rel=2e-3), key  # the cache's fp16 rounding


def test_fp16_student_outputs_give_finite_losses_whose_values_are_the_float32_ones():
    """Under --amp fp16 the head's maps are fp16: a sum of all their box logits overflows fp16
    (inf, and inf x 0 is NaN), so no term may be built on one (the zero of a term that is off)."""
    level_hw, boxes, labels, s_cls, s_box, t_cls, t_box = _batch()
    s_box = s_box + 8.0  # a trained head's logits: their sum is beyond fp16's 65504
    assert torch.isinf(s_box.half().sum())
    for cfg in (BCKD, LossConfig(recipe="paper", bckd_cls_weight=1.0), LossConfig(recipe="paper")):
        full = _losses(cfg, level_hw, boxes, labels, s_cls, s_box, t_cls, t_box)
        cls_maps = [m.half().requires_grad_() for m in _as_maps(s_cls, level_hw)]
        box_maps = [m.half().requires_grad_() for m in _as_maps(s_box, level_hw)]
        half = compute_losses(cls_maps, box_maps, level_hw, boxes, labels, cfg, 3, 16, STRIDES,
                              teacher_rows=(t_box, t_cls))
        for key, value in half.items():
            assert torch.isfinite(value), (cfg.recipe, key)
            assert float(value.detach()) == pytest.approx(float(full[key].detach()), rel=1e-2, abs=1e-4), key
        half["loss"].backward()
        assert all(torch.isfinite(m.grad).all() for m in cls_maps + box_maps)
