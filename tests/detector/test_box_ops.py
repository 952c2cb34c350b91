import pytest
import torch

from detector.box_ops import (
    aligned_giou,
    aligned_iou,
    box_area,
    box_to_distance,
    distance_to_box,
    pairwise_diou,
    pairwise_iou,
)

A = torch.tensor([[0.0, 0.0, 10.0, 10.0]])


def test_iou_of_hand_computed_boxes():
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 5.0]])
    # identical 1; half overlap 50 / 150; disjoint 0; contained 50 / 100
    assert pairwise_iou(A, b)[0].tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.5])
    assert box_area(b).tolist() == [100.0, 100.0, 100.0, 50.0]
    assert aligned_iou(A.expand(4, 4), b).tolist() == pytest.approx(pairwise_iou(A, b)[0].tolist())


def test_giou_penalises_the_empty_part_of_the_enclosing_box():
    far = torch.tensor([[20.0, 0.0, 30.0, 10.0]])
    # IoU 0, enclosing box 30 x 10 = 300, union 200: GIoU = 0 - (300 - 200) / 300
    assert float(aligned_giou(A, far)) == pytest.approx(-1 / 3)
    assert float(aligned_giou(A, A)) == pytest.approx(1.0)


def test_diou_true_and_official_variants():
    inside = torch.tensor([[0.0, 0.0, 10.0, 5.0]])  # an anchor inside the GT A
    # centre distance^2 = 2.5^2, enclosing diagonal^2 = 10^2 + 10^2
    assert float(pairwise_diou(inside, A)) == pytest.approx(0.5 - 6.25 / 200)
    # official: intersection / area(anchor) = 50 / 50 = 1 instead of the IoU 0.5
    assert float(pairwise_diou(inside, A, official=True)) == pytest.approx(1.0 - 6.25 / 200)


def test_distance_coding_round_trips_and_clamps():
    points = torch.tensor([[5.0, 5.0], [2.0, 8.0]])
    boxes = torch.tensor([[1.0, 2.0, 9.0, 7.0], [0.0, 0.0, 4.0, 10.0]])
    dist = box_to_distance(points, boxes)
    assert dist[0].tolist() == [4.0, 3.0, 4.0, 2.0]  # left, top, right, bottom
    assert torch.allclose(distance_to_box(points, dist), boxes)
    clamped = box_to_distance(points, boxes, max_dist=3.0, eps=0.1)
    assert float(clamped.max()) == pytest.approx(2.9)  # the last DFL bin keeps a right neighbour
    clipped = distance_to_box(points, torch.full((2, 4), 100.0), max_hw=(20, 30))
    assert clipped.tolist() == [[0.0, 0.0, 30.0, 20.0], [0.0, 0.0, 30.0, 20.0]]  # inside a 20 x 30 image
