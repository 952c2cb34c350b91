"""A cache serves subsets of its images: another annotation file holding some of the cached images
with the same annotations, or a seeded fraction; anything else is refused naming the image."""

import json
import shutil

import pytest

from cache_teacher.reader import CacheReader
from cache_teacher.targets import CachedTeacher
from core.errors import UserError
from data.builders import build_train_dataset
from data.config import DataConfig
from detector import ModelConfig
from distill.config import LossConfig
from tests.cli_runner import assert_user_error, run_cli
from tests.conftest import TINY_MODEL, TINY_MODEL_FLAGS, dump_tiny_cache


def _subset_file(tiny, path, keep=(1, 2, 3, 5, 8), edit=None):
    coco = json.loads(tiny["ann"].read_text())
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    if edit is not None:
        edit(coco)
    path.write_text(json.dumps(coco))
    return path


def _validate(cache, tiny, ann, **data):
    cfg = DataConfig(images=str(tiny["images"]), ann=str(ann), img_scale=(96, 96), **data)
    dataset = build_train_dataset(cfg, (8, 16, 32, 64, 128))
    CachedTeacher(cache).validate(dataset, ModelConfig(num_classes=5, **TINY_MODEL), LossConfig().teacher_needs())
    return dataset


def test_a_subset_file_and_a_seeded_fraction_are_served(tiny_coco, tiny_cache, tmp_path):
    cache = CacheReader(tiny_cache)
    subset = _validate(cache, tiny_coco, _subset_file(tiny_coco, tmp_path / "sub.json"))
    assert subset.image_ids == [1, 2, 3, 5, 8]
    targets = CachedTeacher(cache).dataset(subset, LossConfig().teacher_needs())
    item = targets[(3, 1)]  # image id 5, flipped: its own cached rows
    v = cache.view_index(cache.index_of_image[5], 1)
    assert item.sample.record == cache.records[v] and item.stored["box"].shape[0] == cache.records[v].num_rows
    half = _validate(cache, tiny_coco, tiny_coco["ann"], subset_fraction=0.5, subset_seed=3)
    assert len(half) == 5 and half.image_ids == _validate(cache, tiny_coco, tiny_coco["ann"], subset_fraction=0.5,
                                                          subset_seed=3).image_ids  # reproducible


def test_a_changed_box_or_an_unknown_image_is_refused_naming_it(tiny_coco, tiny_cache, tmp_path):
    cache = CacheReader(tiny_cache)

    def move_a_box(coco):
        next(a for a in coco["annotations"] if a["image_id"] == 3 and not a["iscrowd"])["bbox"][0] += 1.0

    with pytest.raises(UserError, match="image 3 differs from the cached one"):
        _validate(cache, tiny_coco, _subset_file(tiny_coco, tmp_path / "moved.json", edit=move_a_box))

    def add_an_image(coco):
        coco["images"].append({**coco["images"][0], "id": 99})
        coco["annotations"].append({**coco["annotations"][0], "id": 9999, "image_id": 99})

    with pytest.raises(UserError, match="image 99 is not in the cache"):
        _validate(cache, tiny_coco, _subset_file(tiny_coco, tmp_path / "new.json", edit=add_an_image))


def test_the_command_line_trains_a_subset_and_refuses_a_changed_one(tiny_coco, tiny_cache, tmp_path):
    args = ["train-student", "--cache", tiny_cache, "--images", tiny_coco["images"], "--workers", "0",
            *TINY_MODEL_FLAGS, "--batch-size", "2", "--max-iters", "2", "--log-every", "1"]
    proc = run_cli(*args, "--ann", _subset_file(tiny_coco, tmp_path / "sub.json"), "--out", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["dataset"]["num_images"] == 5
    proc = run_cli(*args, "--ann", tiny_coco["ann"], "--subset-fraction", "0.3", "--out", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dataset"]["num_images"] == 3

    def relabel(coco):
        ann = next(a for a in coco["annotations"] if a["image_id"] == 2 and not a["iscrowd"])
        ann["category_id"] = 1 if ann["category_id"] != 1 else 2  # another class (crowd boxes are never read)

    proc = run_cli(*args, "--ann", _subset_file(tiny_coco, tmp_path / "x.json", edit=relabel), "--out", tmp_path / "c")
    assert_user_error(proc, "image 2 differs from the cached one")


def test_region_sparse_caches_serve_subsets_and_v1_caches_only_their_dataset(tiny_coco, tiny_teacher, tmp_path):
    sparse = CacheReader(dump_tiny_cache(tiny_coco, tiny_teacher["path"], tmp_path / "sparse.zarr",
                                          store_regions="main+vlr"))
    subset = _validate(sparse, tiny_coco, _subset_file(tiny_coco, tmp_path / "sub.json"))
    assert len(subset) == 5
    # A format-v1 cache (as ldcache 0.1 wrote it): no digests, so the dumped dataset only.
    v1 = shutil.copytree(sparse.location, tmp_path / "v1.zarr")
    meta = json.loads((v1 / "zarr.json").read_text())
    meta["attributes"]["ldcache"]["format_version"] = 1
    (v1 / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(v1 / "dataset" / "image_digests")
    old = CacheReader(v1)
    assert old.meta.format_version == 1 and old.image_digests is None
    _validate(old, tiny_coco, tiny_coco["ann"])  # its own dataset: as before
    with pytest.raises(UserError, match="format v1 has no per-image annotation digests"):
        _validate(old, tiny_coco, _subset_file(tiny_coco, tmp_path / "sub2.json"))
