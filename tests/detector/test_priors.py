import torch

from detector.priors import ANCHOR_SCALE, anchor_centres, image_priors, level_priors


def test_level_priors_are_square_anchors_of_eight_strides_centred_on_the_grid():
    anchors = level_priors((2, 3), stride=16)
    assert anchors.shape == (6, 4)
    centres = anchor_centres(anchors)
    # row-major over (y, x), offset 0: centres at (x * s, y * s)
    assert centres.tolist() == [[0, 0], [16, 0], [32, 0], [0, 16], [16, 16], [32, 16]]
    sides = anchors[:, 2:] - anchors[:, :2]
    assert torch.all(sides == ANCHOR_SCALE * 16)


def test_image_priors_are_level_major_with_their_stride_and_level():
    level_hw = ((4, 4), (2, 2), (1, 1))
    anchors, strides, levels = image_priors(level_hw, (8, 16, 32))
    assert anchors.shape == (16 + 4 + 1, 4)
    assert levels.tolist() == [0] * 16 + [1] * 4 + [2]
    assert strides.tolist() == [8.0] * 16 + [16.0] * 4 + [32.0]
    assert torch.equal(anchors[16:20], level_priors((2, 2), 16))
