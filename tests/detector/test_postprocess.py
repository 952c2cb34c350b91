import pytest
import torch

from data.views import ViewSpec, level_sizes, plan_view
from detector.postprocess import PostprocessConfig, batched_nms, nms, postprocess

STRIDES = (8, 16, 32, 64, 128)


def test_nms_keeps_the_best_of_overlapping_boxes_only():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 1, 11, 11], [20.0, 20, 30, 30]])
    scores = torch.tensor([0.8, 0.9, 0.5])
    assert nms(boxes, scores, iou_thr=0.6).tolist() == [1, 2]  # box 0 overlaps box 1 (IoU 0.68) and loses
    assert nms(boxes, scores, iou_thr=0.7).tolist() == [1, 0, 2]  # below the threshold nothing is dropped
    # other classes never suppress each other
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.6).tolist() == [1, 0, 2]


def test_a_confident_location_decodes_to_its_box_in_original_pixels():
    record = plan_view(1, (64, 64), ViewSpec(False, (128, 128)), STRIDES)  # upscaled x2 to 128 x 128
    level_hw = level_sizes(record.padded_hw, STRIDES)
    cls = [torch.full((1, 2, h, w), -20.0) for h, w in level_hw]
    box = [torch.zeros(1, 4 * 17, h, w) for h, w in level_hw]
    cls[1][0, 1, 3, 4] = 5.0  # class 1 at P4 location (y=3, x=4): centre (64, 48) in view pixels
    edges = box[1][0, :, 3, 4].view(4, 17)
    edges[:, 2] = 50.0  # every edge 2 strides = 32 px (a near one-hot distribution)
    det = postprocess(cls, box, [record], STRIDES, 16, PostprocessConfig())[0]
    assert det.labels.tolist() == [1]
    # view box (32, 16, 96, 80) at scale 2 -> original (16, 8, 48, 40)
    assert torch.allclose(det.boxes[0], torch.tensor([16.0, 8.0, 48.0, 40.0]), atol=1e-3)
    assert float(det.scores[0]) == torch.sigmoid(torch.tensor(5.0)).item()


@pytest.mark.parametrize("n, classes", [(1500, 6), (3000, 80), (800, 1)])
def test_class_by_class_nms_keeps_exactly_what_one_nms_over_offset_boxes_keeps(n, classes):
    """Above PER_CLASS_FROM boxes batched_nms suppresses each class on its own: the same boxes in
    the same order as the one NMS over class-offset boxes (mmdetection's way), ties included."""
    from detector import postprocess as pp

    g = torch.Generator().manual_seed(n + classes)
    centres = torch.rand(30, 2, generator=g) * 500  # clusters of boxes, as around objects
    xy = centres[torch.randint(0, 30, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 10
    boxes = torch.cat([xy, xy + 40 + torch.rand(n, 2, generator=g) * 40], 1)
    scores = (torch.rand(n, generator=g) * 20).round() / 20  # many ties
    labels = torch.randint(0, classes, (n,), generator=g)
    assert n > pp.PER_CLASS_FROM or classes == 1
    one = pp.nms(boxes + (labels.float() * (boxes.max() + 1))[:, None], scores, 0.6)
    kept = batched_nms(boxes, scores, labels, 0.6)
    assert torch.equal(kept, one) and 0 < len(kept) < n
