"""Where distillation applies: the VLR band on hand-built anchors, and the selection against the
band rule evaluated on every anchor."""

import pytest
import torch

from data.views import level_sizes
from detector.atss import BatchAssignment, assign_batch
from detector.box_ops import pairwise_iou
from detector.regions import vlr_region


def _assignment(anchors, gt_boxes, thresholds):
    n = anchors.shape[0]
    return BatchAssignment(
        anchors=anchors, strides=torch.full((n,), 8.0), levels=torch.zeros(n, dtype=torch.long),
        images=torch.zeros(n, dtype=torch.long), labels=torch.zeros(n, dtype=torch.long),
        pos=torch.zeros(0, dtype=torch.long), pos_gt_boxes=torch.zeros(0, 4), rows_per_image=[n],
        gt_boxes_per_image=[gt_boxes], thresholds_per_image=[thresholds],
        ious_per_image=[pairwise_iou(anchors, gt_boxes)],
    )


def test_vlr_band_on_hand_built_anchors():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # the GT itself: DIoU 1 >= thr, too good for the band
        [0.0, 0.0, 10.0, 5.0],  # inside the GT: official overlap = 50/50 = 1 -> 0.97; true DIoU 0.5 - 6.25/200 = 0.47
        [5.0, 0.0, 15.0, 10.0],  # half over: official 0.5 - 25/325 = 0.42; true 1/3 - 25/325 = 0.26
        [20.0, 20.0, 30.0, 30.0],  # no overlap: DIoU < 0
        [8.0, 8.0, 18.0, 18.0],  # corner overlap 4: official 0.04 - 169/324 < 0.125
    ])
    assign = _assignment(anchors, gt, torch.tensor([0.5]))
    official = vlr_region(assign, gamma=0.25, iou="official")  # band [0.125, 0.5)
    assert official.rows.tolist() == [2]
    assert official.weights.tolist() == pytest.approx([1 / 3])  # the weight is the IoU, not the DIoU
    true = vlr_region(assign, gamma=0.25, iou="diou")
    assert true.rows.tolist() == [1, 2]
    assert true.weights.tolist() == pytest.approx([0.5, 1 / 3])
    assert vlr_region(assign, gamma=0.9, iou="diou").rows.tolist() == [1]  # band [0.45, 0.5): only 0.47


def _vlr_over_all_anchors(assign, gamma, iou):
    """The band rule evaluated on every anchor (no shortcut): the reference for vlr_region."""
    from detector.box_ops import pairwise_diou

    rows, weights, start = [], [], 0
    for n, gt, thr, ious in zip(assign.rows_per_image, assign.gt_boxes_per_image, assign.thresholds_per_image,
                                assign.ious_per_image):
        if len(gt):
            diou = pairwise_diou(assign.anchors[start:start + n], gt, official=iou == "official")
            in_band = (diou >= gamma * thr[None, :]) & (diou < thr[None, :])
            best, _ = torch.where(in_band, ious, torch.full_like(ious, -1.0)).max(dim=1)
            sel = (best >= 0).nonzero().squeeze(1)
            rows.append(sel + start)
            weights.append(best[sel])
        start += n
    return torch.cat(rows), torch.cat(weights)


@pytest.mark.parametrize("iou", ["official", "diou"])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.75])
def test_vlr_region_equals_the_rule_over_every_anchor(iou, gamma):
    """vlr_region evaluates the band only for anchors overlapping a GT; on random images with boxes
    of every size (some touching, some outside the image) it selects what the full rule selects."""
    g = torch.Generator().manual_seed(11)
    level_hw, gts, labels = [], [], []
    for h, w in [(96, 128), (160, 96), (64, 64)]:
        k = int(torch.randint(1, 9, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w, h]) - 8
        wh = torch.rand(k, 2, generator=g) ** 2 * torch.tensor([w, h]) + 1
        gts.append(torch.cat([xy, xy + wh], dim=1))
        labels.append(torch.zeros(k, dtype=torch.long))
        level_hw.append(level_sizes((h, w), (8, 16, 32, 64, 128)))
    assign = assign_batch(level_hw, gts, labels, (8, 16, 32, 64, 128), num_classes=1)
    region = vlr_region(assign, gamma, iou)
    rows, weights = _vlr_over_all_anchors(assign, gamma, iou)
    assert rows.numel() > 0
    assert torch.equal(region.rows, rows) and torch.equal(region.weights, weights)


@pytest.mark.parametrize("iou", ["official", "diou"])
def test_the_batched_vlr_equals_the_image_by_image_selection(iou):
    """Mixed canvases, empty images and many GTs: the padded-grid selection is the per-image one."""
    import dataclasses

    g = torch.Generator().manual_seed(5)
    for trial in range(10):
        level_hw, gts, labels = [], [], []
        for b in range(int(torch.randint(1, 5, (1,), generator=g))):
            h, w = [(64, 96), (96, 64), (32, 32), (160, 128)][int(torch.randint(4, (1,), generator=g))]
            k = int(torch.randint(0 if b else 1, 25, (1,), generator=g))
            xy = torch.rand(k, 2, generator=g) * torch.tensor([w, h]) - 6
            gts.append(torch.cat([xy, xy + torch.rand(k, 2, generator=g) ** 2 * torch.tensor([w, h]) + 2], 1))
            labels.append(torch.zeros(k, dtype=torch.long))
            level_hw.append(level_sizes((h, w), (8, 16, 32, 64, 128)))
        assign = assign_batch(level_hw, gts, labels, (8, 16, 32, 64, 128), num_classes=1)
        for gamma in (0.0, 0.25, 0.7):
            batched = vlr_region(assign, gamma, iou)
            alone = vlr_region(dataclasses.replace(assign, padded=None), gamma, iou)
            assert torch.equal(batched.rows, alone.rows) and torch.equal(batched.weights, alone.weights), trial
