import torch

from data.views import level_sizes
from detector.atss import TOPK, assign_batch, atss_assign
from detector.box_ops import pairwise_iou
from detector.priors import image_priors

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


def _assign_image_by_image(level_hw_per_image, gts, labels, num_classes):
    """The per-image reference: atss_assign on each image's own priors, rows concatenated."""
    pos, pos_gt, labels_rows, thresholds, ious, anchors = [], [], [], [], [], []
    offset = 0
    for level_hw, g, lab in zip(level_hw_per_image, gts, labels):
        a, _, _ = image_priors(level_hw, STRIDES)
        result = atss_assign(a, [h * w for h, w in level_hw], g)
        p = (result.gt_index >= 0).nonzero().squeeze(1)
        row_labels = torch.full((a.shape[0],), num_classes, dtype=torch.long)
        row_labels[p] = lab[result.gt_index[p]]
        pos.append(p + offset), pos_gt.append(g[result.gt_index[p]]), labels_rows.append(row_labels)
        thresholds.append(result.thresholds), ious.append(result.ious), anchors.append(a)
        offset += a.shape[0]
    return (
        torch.cat(pos),
        torch.cat(pos_gt).reshape(-1, 4),
        torch.cat(labels_rows),
        thresholds,
        ious,
        torch.cat(anchors),
    )


def _random_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    canvases = [(64, 96), (96, 64), (32, 32), (128, 160), (64, 96)]
    level_hw, gts, labels = [], [], []
    for b in range(int(torch.randint(1, 6, (1,), generator=g))):
        h, w = canvases[int(torch.randint(len(canvases), (1,), generator=g))]
        level_hw.append(level_sizes((h, w), STRIDES))
        k = int(torch.randint(0, 31, (1,), generator=g)) if b else int(torch.randint(1, 31, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w, h]) - 6  # some boxes cross the border
        wh = torch.rand(k, 2, generator=g) ** 2 * torch.tensor([w, h]) + 2
        gts.append(torch.cat([xy, xy + wh], 1).round())  # integer boxes: exact distance ties happen
        labels.append(torch.randint(0, 4, (k,), generator=g))
    return level_hw, gts, labels


def test_the_batched_assignment_equals_the_per_image_assignment_on_random_batches():
    checked = 0
    for seed in range(40):
        level_hw, gts, labels = _random_batch(seed)
        batch = assign_batch(level_hw, gts, labels, STRIDES, num_classes=4)
        pos, pos_gt, row_labels, thresholds, ious, anchors = _assign_image_by_image(level_hw, gts, labels, 4)
        assert torch.equal(batch.pos, pos), seed
        assert torch.equal(batch.pos_gt_boxes, pos_gt) and torch.equal(batch.labels, row_labels), seed
        assert torch.equal(batch.anchors, anchors)
        for got, want in zip(batch.thresholds_per_image, thresholds):
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(a, b) for a, b in zip(batch.ious_per_image, ious))
        checked += pos.numel()
    assert checked > 500  # the cases exercise the assigner
