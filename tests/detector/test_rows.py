import pytest
import torch

from detector.rows import flatten_rows, image_level_rows, row_index, row_location, view_maps


def _maps(b, k, level_hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, k, h, w, generator=g) for h, w in level_hw]


def test_rows_are_level_major_then_y_then_x():
    maps = [torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(1, 2, 2, 3), torch.full((1, 2, 1, 2), -1.0)]
    rows = flatten_rows(maps, [((2, 3), (1, 2))])
    assert rows.shape == (6 + 2, 2)
    # location (y=0, x=1) of P3 is row 1; its 2 channels are maps[0][0, :, 0, 1] = (1, 7)
    assert rows[1].tolist() == [1.0, 7.0]
    assert rows[3].tolist() == [3.0, 9.0]  # (y=1, x=0)
    assert rows[6:].tolist() == [[-1.0, -1.0]] * 2  # then P4


def test_each_image_contributes_only_its_own_locations():
    canvas = ((4, 6), (2, 3))
    own = [((4, 6), (2, 3)), ((3, 4), (2, 2))]  # the second image is smaller than the batch canvas
    maps = _maps(2, 5, canvas)
    rows = flatten_rows(maps, own)
    assert rows.shape[0] == (24 + 6) + (12 + 4)  # no row for the padding
    second = rows[30:]
    assert torch.equal(second[:12], maps[0][1, :, :3, :4].permute(1, 2, 0).reshape(12, 5))
    assert torch.equal(second[12:], image_level_rows(maps[1], 1, (2, 2)))


def test_equal_canvases_take_the_fast_path_with_the_same_rows():
    level_hw = ((4, 6), (2, 3), (1, 2))
    maps = _maps(3, 7, level_hw)
    fast = flatten_rows(maps, [level_hw] * 3)
    slow = torch.cat([image_level_rows(m, i, hw) for i in range(3) for m, hw in zip(maps, level_hw)])
    assert torch.equal(fast, slow)


def test_view_maps_is_the_inverse_for_one_view():
    level_hw = ((4, 6), (2, 3))
    maps = _maps(1, 3, level_hw)
    back = view_maps(flatten_rows(maps, [level_hw]), level_hw)
    assert all(torch.equal(a, b[0]) for a, b in zip(back, maps))


def test_row_location_and_row_index_are_inverse():
    level_hw = ((4, 6), (2, 3), (1, 1))
    for row in range(24 + 6 + 1):
        assert row_index(level_hw, *row_location(level_hw, row)) == row
    assert row_location(level_hw, 24 + 4) == (1, 1, 1)
    with pytest.raises(IndexError):
        row_location(level_hw, 31)
