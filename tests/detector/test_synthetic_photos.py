"""make-synthetic --pixels photos: real pixels (scikit-image's sample photographs), exact boxes,
reproducible, and a one-line error when the photographs are not installed."""

import json

import numpy as np
import pytest

from core.errors import UserError
from data import synthetic_photos
from data.synthetic import make_synthetic
from data.synthetic_photos import PHOTO_CLASSES, render_photo_image
from tests.cli_runner import assert_user_error, run_cli

TINY = dict(num_train=6, num_val=2, image_size=128, seed=3, num_classes=12, pixels="photos")


def test_photo_dataset_is_reproducible_with_twelve_named_classes(tmp_path):
    a = make_synthetic(tmp_path / "a", **TINY)
    b = make_synthetic(tmp_path / "b", **TINY, workers=2)
    for split in ("train", "val"):
        for f in sorted((a / split).iterdir()):
            assert f.read_bytes() == (b / split / f.name).read_bytes()  # workers change nothing
    coco = json.loads((a / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(PHOTO_CLASSES) and len(PHOTO_CLASSES) >= 10
    assert coco["info"]["params"]["pixels"] == "photos"
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    assert coco["annotations"]
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height and w >= 4 and h >= 4
        assert 0.5 <= ann["visible"] <= 1.0


def test_an_object_fills_its_box_with_the_photographs_pixels():
    """Where no later paint covers it, an object's box is the extent of what was painted: the pixels
    inside the box but outside every other box differ from a render without that object."""
    image, anns = render_photo_image(0, "train", 5, 160, 12, {"min_objects": 1, "max_objects": 1})
    assert len(anns) == 1 and anns[0]["iscrowd"] == 0
    x, y, w, h = (int(v) for v in anns[0]["bbox"])
    inside = image[y:y + h, x:x + w].astype(np.float32)
    assert inside.std() > 5  # a photograph's texture, not a flat fill


def test_missing_photographs_are_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_photos.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install 'ldcache\\[photos\\]'"):
        make_synthetic(tmp_path / "out", **TINY)
    assert not (tmp_path / "out").exists()


def test_more_classes_than_shapes_need_photos(tmp_path):
    assert_user_error(run_cli("make-synthetic", tmp_path / "out", "--num-classes", "12"), "at most 8",
                      "--pixels photos")
    assert not (tmp_path / "out").exists()
