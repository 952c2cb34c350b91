import torch

from detector.atss import TOPK, assign_batch, atss_assign
from detector.box_ops import pairwise_iou
from detector.priors import image_priors
from detector.views import level_sizes

STRIDES = (8, 16, 32, 64, 128)


def test_threshold_is_mean_plus_std_of_the_closest_candidates():
    level_hw = level_sizes((128, 128), STRIDES)
    anchors, _, _ = image_priors(level_hw, STRIDES)
    gt = torch.tensor([[30.0, 30.0, 90.0, 80.0]])
    result = atss_assign(anchors, [h * w for h, w in level_hw], gt)
    # Recompute the rule by hand: per level the TOPK anchors closest to the GT centre.
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    dist = (centres - torch.tensor([60.0, 55.0])).norm(dim=1)
    ious = pairwise_iou(anchors, gt)[:, 0]
    candidates, start = [], 0
    for h, w in level_hw:
        k = min(TOPK, h * w)
        candidates.append(dist[start:start + h * w].topk(k, largest=False).indices + start)
        start += h * w
    cand = torch.cat(candidates)
    thr = ious[cand].mean() + ious[cand].std()
    assert torch.allclose(result.thresholds, thr[None])
    inside = (centres[cand] > gt[0, :2] + 0.01).all(1) & (centres[cand] < gt[0, 2:] - 0.01).all(1)
    expected = cand[(ious[cand] >= thr) & inside]
    assert torch.equal(torch.sort((result.gt_index == 0).nonzero().squeeze(1)).values, torch.sort(expected).values)
    assert expected.numel() > 0


def test_an_anchor_positive_for_two_gts_takes_the_one_of_higher_iou():
    level_hw = level_sizes((64, 64), STRIDES)
    anchors, _, _ = image_priors(level_hw, STRIDES)
    gts = torch.tensor([[0.0, 0.0, 40.0, 40.0], [4.0, 4.0, 44.0, 44.0]])  # two GTs almost on top of each other
    result = atss_assign(anchors, [h * w for h, w in level_hw], gts)
    ious = pairwise_iou(anchors, gts)
    pos = (result.gt_index >= 0).nonzero().squeeze(1)
    assert pos.numel() > 0
    for a in pos.tolist():
        g = int(result.gt_index[a])
        assert ious[a, g] >= ious[a, 1 - g] or ious[a, 1 - g] < result.thresholds[1 - g]


def test_no_gt_means_every_anchor_is_negative():
    level_hw = level_sizes((64, 64), STRIDES)
    anchors, _, _ = image_priors(level_hw, STRIDES)
    result = atss_assign(anchors, [h * w for h, w in level_hw], torch.zeros(0, 4))
    assert bool((result.gt_index == -1).all()) and result.thresholds.numel() == 0


def test_batch_assignment_lays_images_out_one_after_another():
    hw_a, hw_b = level_sizes((64, 96), STRIDES), level_sizes((96, 64), STRIDES)
    gts = [torch.tensor([[10.0, 10.0, 50.0, 40.0]]), torch.tensor([[5.0, 30.0, 45.0, 90.0], [0.0, 0.0, 20.0, 20.0]])]
    labels = [torch.tensor([2]), torch.tensor([0, 1])]
    batch = assign_batch([hw_a, hw_b], gts, labels, STRIDES, num_classes=3)
    n_a = sum(h * w for h, w in hw_a)
    assert batch.rows_per_image == [n_a, sum(h * w for h, w in hw_b)]
    assert batch.images[:n_a].eq(0).all() and batch.images[n_a:].eq(1).all()
    alone = atss_assign(image_priors(hw_b, STRIDES)[0], [h * w for h, w in hw_b], gts[1])
    pos_b = batch.pos[batch.pos >= n_a] - n_a
    assert torch.equal(pos_b, (alone.gt_index >= 0).nonzero().squeeze(1))  # the second image's own result
    assert set(batch.labels[batch.pos].tolist()) <= {0, 1, 2} and int((batch.labels == 3).sum()) > 0  # 3 = negative
