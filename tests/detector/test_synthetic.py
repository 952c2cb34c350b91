"""The synthetic dataset: valid COCO, deterministic, varied, atomic, and cached once by default."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from core.errors import UserError
from data import synthetic, synthetic_render
from data.synthetic import ensure_synthetic_default, make_synthetic
from data.synthetic_shapes import SHAPES, rasterise, sample_shape_params, shape_inside

TINY = dict(num_train=6, num_val=3, image_size=96)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("tiny") / "data", seed=0, **TINY)


def _load(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _pixels(root, split, file_name):
    return np.asarray(Image.open(root / split / file_name))


def test_same_seed_is_identical_and_workers_do_not_matter(tiny, tmp_path):
    again = make_synthetic(tmp_path / "again", seed=0, workers=2, **TINY)
    for split in ("train", "val"):
        # Byte-equal JSON: same ids, boxes and recorded parameters (workers is not one of them).
        assert (tiny / "annotations" / f"instances_{split}.json").read_bytes() == (
            again / "annotations" / f"instances_{split}.json").read_bytes()
        for image in _load(tiny, split)["images"]:
            name = image["file_name"]
            assert np.array_equal(_pixels(tiny, split, name), _pixels(again, split, name))


def test_other_seed_and_other_split_differ(tiny, tmp_path):
    other = make_synthetic(tmp_path / "other", seed=1, **TINY)
    # Any overlap of 6 random scenes would be a seeding bug, not chance.
    assert _load(other, "train")["annotations"] != _load(tiny, "train")["annotations"]
    assert not np.array_equal(_pixels(other, "train", "000001.png"),
                              _pixels(tiny, "train", "000001.png"))
    # The split is part of each image's seed, so val image 1 is not train image 1.
    assert not np.array_equal(_pixels(tiny, "val", "000001.png"),
                              _pixels(tiny, "train", "000001.png"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_valid_coco_with_boxes_inside_images(tiny, split):
    coco = COCO(str(tiny / "annotations" / f"instances_{split}.json"))
    data = _load(tiny, split)
    assert len(data["images"]) == TINY[f"num_{split}"]
    assert sorted(coco.getCatIds()) == list(range(1, len(SHAPES[:6]) + 1))  # default 6 classes
    image_ids = [im["id"] for im in data["images"]]
    ann_ids = [a["id"] for a in data["annotations"]]
    assert min(image_ids) >= 1 and len(set(image_ids)) == len(image_ids)
    assert min(ann_ids) >= 1 and len(set(ann_ids)) == len(ann_ids)
    assert data["info"]["params"]["seed"] == 0 and data["info"]["version"] >= 1
    for image in data["images"]:
        with Image.open(tiny / split / image["file_name"]) as im:
            assert im.size == (image["width"], image["height"]) and im.mode == "RGB"
        # Sizes are drawn in [0.6, 1.0] x image_size.
        assert round(0.6 * 96) <= min(image["width"], image["height"])
        assert max(image["width"], image["height"]) <= 96
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"], iscrowd=None))
        assert len(anns) >= 1  # the first object always finds room: nothing is there yet
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and ann["area"] > 0
            assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
            assert ann["category_id"] in coco.getCatIds() and ann["iscrowd"] in (0, 1)


def test_objects_vary_in_size_aspect_blur_contrast_and_occlusion(tmp_path):
    root = make_synthetic(tmp_path / "spread", num_train=40, num_val=1, image_size=128)
    anns = [a for a in _load(root, "train")["annotations"] if not a["iscrowd"]]
    sides = [s for a in anns for s in a["bbox"][2:]]
    aspects = [a["bbox"][2] / a["bbox"][3] for a in anns]
    # sqrt(area) is log-uniform from 12 px to 70% of the short side (>= 77 px) and w/h spans
    # [1/4, 4], so ~180 objects surely include thin sides and sides above half the image.
    assert min(sides) < 16 and max(sides) > 60
    assert min(aspects) < 0.5 and max(aspects) > 2.0
    blurs = [a["blur"] for a in anns]
    # 40% are drawn sharp and 25% with sigma in [1.5, 4] (capped at a quarter of the short side).
    assert min(blurs) == 0.0 and max(blurs) >= 1.5
    assert min(a["contrast"] for a in anns) < 0.15  # 15% are low contrast (RGB step 10-28)
    visible = [a["visible"] for a in anns]
    # Later paint may hide an object, but never more than half of it.
    assert min(visible) < 0.95 and min(visible) >= synthetic_render.MIN_VISIBLE - 1e-3


@pytest.mark.parametrize("name", SHAPES)
def test_each_shape_touches_every_side_of_its_box(name):
    rng = np.random.default_rng(3)
    box = [10.3, 20.7, 50.2, 30.9]  # fractional corners: the box is not pixel aligned
    for _ in range(5):
        inside = shape_inside(name, sample_shape_params(name, rng))
        cover = rasterise(inside, box, 0, 0, 80, 70, supersample=8)
        cols, rows = np.nonzero(cover.any(axis=0))[0], np.nonzero(cover.any(axis=1))[0]
        # The bbox is the amodal extent: coverage starts within a pixel of each side (a star tip
        # is too thin to hit a sample right at the side) and never crosses it.
        assert math.floor(box[0]) <= cols[0] <= box[0] + 1
        assert box[0] + box[2] - 1 <= cols[-1] + 1 <= math.ceil(box[0] + box[2])
        assert math.floor(box[1]) <= rows[0] <= box[1] + 1
        assert box[1] + box[3] - 1 <= rows[-1] + 1 <= math.ceil(box[1] + box[3])


def test_crowd_regions_on_the_smallest_images(tmp_path):
    root = make_synthetic(tmp_path / "crowd", num_train=4, num_val=1, image_size=64,
                          crowd_prob=1.0)
    data = _load(root, "train")
    COCO(str(root / "annotations" / "instances_train.json"))
    crowds = [a for a in data["annotations"] if a["iscrowd"] == 1]
    assert len(crowds) == 4  # crowd_prob=1: exactly one crowd region per image
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for ann in crowds:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= sizes[ann["image_id"]][0]
        assert y + h <= sizes[ann["image_id"]][1] and ann["area"] <= w * h + 1e-6


def test_one_class(tmp_path):
    root = make_synthetic(tmp_path / "one", num_train=3, num_val=1, image_size=64, num_classes=1)
    data = _load(root, "train")
    assert data["categories"] == [{"id": 1, "name": "ellipse", "supercategory": "shape"}]
    assert {a["category_id"] for a in data["annotations"]} == {1}


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        make_synthetic(out, num_train=1, num_val=1, image_size=64)
    assert (out / "notes.txt").exists()  # refused before touching anything
    make_synthetic(out, num_train=1, num_val=1, image_size=64, overwrite=True)
    assert not (out / "notes.txt").exists() and synthetic.is_dataset(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folder left


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    real = synthetic.render_to_file

    def fail_on_third(task):
        if task[2] == 2:
            raise KeyboardInterrupt
        return real(task)
    monkeypatch.setattr(synthetic, "render_to_file", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(tmp_path / "out", num_train=4, num_val=1, image_size=64)
    # Written into a temp sibling, which is removed: no half dataset under any name.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [dict(num_train=0), dict(image_size=32), dict(num_classes=0),
                                 dict(num_classes=len(SHAPES) + 1), dict(seed=-1),
                                 dict(num_train=2.5), dict(crowd_prob=1.5)])
def test_bad_arguments_raise_one_line_user_error(tmp_path, bad):
    with pytest.raises(UserError) as info:
        make_synthetic(tmp_path / "out", **{**TINY, **bad})
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_ensure_default_generates_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULT_SYNTHETIC", dict(
        num_train=2, num_val=1, image_size=64, seed=0, num_classes=6, crowd_prob=0.02))
    calls = []
    real = synthetic.generate_beside
    monkeypatch.setattr(synthetic, "generate_beside", lambda *a, **k: calls.append(1) or real(
        *a, **k))
    first = ensure_synthetic_default(tmp_path)
    assert first == tmp_path / "synthetic-v1" and synthetic.is_dataset(first)
    assert ensure_synthetic_default(tmp_path) == first and len(calls) == 1  # reused, not redone
    monkeypatch.setenv("LDCACHE_HOME", str(tmp_path))
    assert ensure_synthetic_default() == first and len(calls) == 1  # root from $LDCACHE_HOME
    # A folder made with other defaults (an older release) must not pass for the current one.
    monkeypatch.setattr(synthetic, "DEFAULT_SYNTHETIC", {**synthetic.DEFAULT_SYNTHETIC, "seed": 1})
    with pytest.raises(UserError, match="other parameters"):
        ensure_synthetic_default(tmp_path)


def test_ensure_default_loser_of_a_race_uses_the_winner(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULT_SYNTHETIC", dict(
        num_train=2, num_val=1, image_size=64, seed=0, num_classes=6, crowd_prob=0.02))
    real = synthetic.generate_beside

    def rival_finishes_first(out, params, workers):
        mine = real(out, params, workers)
        real(out, params, workers).rename(out)  # the other process renames into place first
        return mine
    monkeypatch.setattr(synthetic, "generate_beside", rival_finishes_first)
    out = ensure_synthetic_default(tmp_path)
    # The loser's rename fails on the non-empty winner; its temp folder is deleted.
    assert synthetic.is_dataset(out) and sorted(p.name for p in tmp_path.iterdir()) == [
        "synthetic-v1"]
