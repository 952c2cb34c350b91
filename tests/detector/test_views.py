"""View geometry and the view transform: mmcv's resize rule, /32 padding, level sizes, flips."""

import math

import pytest
import torch
import torch.nn.functional as F

from data.views import (
    PIXEL_MEAN,
    PIXEL_STD,
    ViewSpec,
    boxes_to_original,
    build_view_input,
    level_sizes,
    parse_views,
    plan_view,
    rescale_size,
    transform_boxes,
)

STRIDES = (8, 16, 32, 64, 128)
ORIG = ViewSpec(flip=False, img_scale=(1333, 800))
HFLIP = ViewSpec(flip=True, img_scale=(1333, 800))


@pytest.mark.parametrize(
    "orig_hw, img_scale, expected",
    [
        # short side binds: scale = min(1333/640, 800/480) = 5/3; 640 * 5/3 = 1066.67 -> 1067
        ((480, 640), (1333, 800), (800, 1067)),
        # the typical COCO 427x640: scale = 800/427; 640 * 800/427 = 1199.06 -> 1199
        ((427, 640), (1333, 800), (800, 1199)),
        # very wide, long side binds: scale = min(1333/1000, 800/100) = 1.333; 133.3 -> 133
        ((100, 1000), (1333, 800), (133, 1333)),
        # tall: scale = min(1333/1000, 800/500) = 1.333; 500 * 1.333 = 666.5 -> int(667.0) = 667
        ((1000, 500), (1333, 800), (1333, 667)),
        # upscaling a small image: scale = min(1333/20, 800/10) = 66.65 -> (666.5 + 0.5, 1333 + 0.5)
        ((10, 20), (1333, 800), (667, 1333)),
        # an image that already fits exactly is left alone
        ((800, 1333), (1333, 800), (800, 1333)),
    ],
)
def test_rescale_size_follows_mmcv_rule(orig_hw, img_scale, expected):
    assert rescale_size(orig_hw, img_scale) == expected  # hand-computed above


def test_plan_view_pads_to_32_and_levels_are_ceil_of_stride():
    record = plan_view(7, (100, 1000), ORIG, STRIDES)
    assert record.resized_hw == (133, 1333)
    assert record.padded_hw == (160, 1344)  # 133 -> 5 * 32, 1333 -> 42 * 32
    # 160/64 = 2.5 -> 3, 160/128 = 1.25 -> 2, 1344/128 = 10.5 -> 11
    assert record.level_hw == ((20, 168), (10, 84), (5, 42), (3, 21), (2, 11))
    assert record.num_rows == sum(h * w for h, w in record.level_hw)
    assert record.scale_factor == (1333 / 1000, 133 / 100)  # per axis, resized / original


def _conv_chain_sizes(hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Spatial sizes after a ResNet stem + stride-2 stages + two extra FPN levels (P3..P7)."""
    x = torch.zeros(1, 1, *hw)
    stem = torch.zeros(1, 1, 7, 7)
    k3 = torch.zeros(1, 1, 3, 3)
    x = F.conv2d(x, stem, stride=2, padding=3)  # stride 2
    x = F.max_pool2d(x, 3, stride=2, padding=1)  # stride 4
    sizes = []
    for _ in range(5):  # C3, C4, C5 / P6, P7: each a 3x3 stride-2 pad-1 conv
        x = F.conv2d(x, k3, stride=2, padding=1)
        sizes.append(tuple(x.shape[-2:]))
    return sizes


@pytest.mark.parametrize("hw", [(160, 1344), (800, 1216), (96, 32), (100, 75), (33, 1)])
def test_level_sizes_equal_conv_chain_output(hw):
    # Padded sizes are multiples of 32, but this holds for any size: odd sizes prove the ceil
    assert level_sizes(hw, STRIDES) == tuple(_conv_chain_sizes(hw))
    ceil = tuple((math.ceil(hw[0] / s), math.ceil(hw[1] / s)) for s in STRIDES)
    assert level_sizes(hw, STRIDES) == ceil


def _random_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def test_build_view_input_shape_and_zero_padding():
    image = _random_image(50, 70)
    record = plan_view(1, (50, 70), ViewSpec(flip=False, img_scale=(100, 60)), STRIDES)
    assert record.resized_hw == (60, 84)  # scale = min(100/70, 60/50) = 1.2
    x = build_view_input(image, record)
    assert x.shape == (3, 64, 96)  # padded to multiples of 32
    assert x.dtype == torch.float32
    # zero padding is applied after normalisation
    assert torch.all(x[:, 60:, :] == 0) and torch.all(x[:, :, 84:] == 0)


def test_constant_image_normalises_to_per_channel_constant():
    image = torch.full((3, 40, 30), 200, dtype=torch.uint8)
    record = plan_view(1, (40, 30), ViewSpec(flip=False, img_scale=(1333, 800)), STRIDES)
    x = build_view_input(image, record)
    h, w = record.resized_hw
    expected = (200 - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    # bilinear interpolation of a constant is that constant, so every pixel is (200 - mean) / std
    assert torch.allclose(x[:, :h, :w], expected.view(3, 1, 1).expand(3, h, w), atol=1e-6)


@pytest.mark.parametrize("img_scale", [(1333, 800), (64, 40)])  # resize up, resize down
def test_flip_is_the_mirror_of_the_unflipped_input(img_scale):
    image = _random_image(45, 67, seed=1)
    plain = plan_view(1, (45, 67), ViewSpec(flip=False, img_scale=img_scale), STRIDES)
    flipped = plan_view(1, (45, 67), ViewSpec(flip=True, img_scale=img_scale), STRIDES)
    x, x_flip = build_view_input(image, plain), build_view_input(image, flipped)
    h, w = plain.resized_hw
    # flip happens before padding, so the image region mirrors and the padding stays bottom/right
    assert torch.equal(x_flip[:, :h, :w], x[:, :h, :w].flip(-1))
    assert torch.all(x_flip[:, h:, :] == 0) and torch.all(x_flip[:, :, w:] == 0)


@pytest.mark.parametrize("img_scale", [(1333, 800), (64, 40)])
def test_resize_is_deterministic_and_stays_in_pixel_range(img_scale):
    image = _random_image(45, 67, seed=2)
    record = plan_view(1, (45, 67), ViewSpec(flip=False, img_scale=img_scale), STRIDES)
    a, b = build_view_input(image, record), build_view_input(image.clone(), record)
    assert torch.equal(a, b)  # the cache relies on rebuilding the input bit for bit
    h, w = record.resized_hw
    std, mean = torch.tensor(PIXEL_STD).view(3, 1, 1), torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    pixels = a[:, :h, :w] * std + mean
    # resized values are rounded back onto the uint8 grid before normalisation
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


def test_build_view_input_does_not_depend_on_thread_count():
    image = _random_image(427, 640, seed=3)
    record = plan_view(1, (427, 640), ORIG, STRIDES)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = build_view_input(image, record)
        torch.set_num_threads(4)
        multi = build_view_input(image, record)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)  # "bit for bit" must hold in workers and in the main process


def test_build_view_input_rejects_size_mismatch():
    record = plan_view(1, (40, 30), ORIG, STRIDES)
    with pytest.raises(ValueError, match="annotation"):
        build_view_input(_random_image(30, 40), record)


def test_transform_boxes_round_trip_with_and_without_flip():
    boxes = torch.tensor([[10.0, 5.0, 50.0, 40.0], [0.0, 0.0, 67.0, 45.0], [33.5, 12.2, 34.5, 13]])
    for spec in (ORIG, ViewSpec(flip=True, img_scale=(64, 40))):
        record = plan_view(1, (45, 67), spec, STRIDES)
        back = boxes_to_original(transform_boxes(boxes, record), record)
        assert torch.allclose(back, boxes, atol=1e-4)  # inside the image, nothing is clipped


def test_flipped_boxes_mirror_about_resized_width_and_clip():
    boxes = torch.tensor([[10.0, 5.0, 50.0, 40.0], [-5.0, 2.0, 80.0, 60.0]])  # 2nd leaves the image
    plain = plan_view(1, (45, 67), ORIG, STRIDES)
    flipped = plan_view(1, (45, 67), HFLIP, STRIDES)
    b, b_flip = transform_boxes(boxes, plain), transform_boxes(boxes, flipped)
    h, w = plain.resized_hw
    # clipped to the resized image, not the padded canvas
    assert torch.allclose(b[1], torch.tensor([0.0, 2.0 * h / 45, float(w), float(h)]))
    # x1' = W - x2, x2' = W - x1 with W the resized width; y unchanged
    expected = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    assert torch.allclose(b_flip, expected)


def test_parse_views_orders_scales_then_kinds():
    specs = parse_views("orig,hflip,orig", (1333, 800), extra_scales=((1333, 640),))
    # duplicates removed, one spec per (scale, kind) in the order given
    names = ["orig@1333x800", "hflip@1333x800", "orig@1333x640", "hflip@1333x640"]
    assert [s.name for s in specs] == names
    with pytest.raises(ValueError):
        parse_views("vflip", (1333, 800))
