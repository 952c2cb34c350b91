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
