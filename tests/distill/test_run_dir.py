"""distill/run_dir.py: what --resume accepts (config_differences) and refuses."""

import json

import pytest
import torch

from core.errors import UserError
from distill.engine import default_config
from distill.run_dir import RunPaths, config_differences, prepare_run_dir


def test_a_key_the_saved_config_lacks_compares_as_its_default():
    defaults = {"model": {"backbone": "resnet", "depth": 50}, "train": {"lr": None}}
    old = {"model": {"depth": 18}}  # written before "backbone" (and the whole "train" table) existed
    assert config_differences(old, {"model": {"backbone": "resnet", "depth": 18}, "train": {"lr": None}},
                              defaults) == []
    # The default stands in for the missing value; a run that now asks for another one still differs.
    assert config_differences(old, {"model": {"backbone": "mobilenet_v2", "depth": 18}}, defaults) == [
        "model.backbone: 'resnet' -> 'mobilenet_v2'"]
    # Without a default (a key of no config field, e.g. the teacher source) a missing key differs.
    assert config_differences({}, {"teacher": {"kind": "cache"}}, defaults) == ["teacher: None -> {'kind': 'cache'}"]


def test_a_run_folder_from_before_a_field_existed_resumes(tmp_path):
    config = {**default_config(), "world_size": 1}
    paths = RunPaths(tmp_path / "run")
    paths.last.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, paths.last)
    saved = json.loads(json.dumps(config))
    del saved["model"]["backbone"]  # config.json of a run made before --backbone
    paths.config.write_text(json.dumps(saved))
    assert prepare_run_dir(paths, config, resume=True, defaults=default_config())
    assert json.loads(paths.config.read_text())["model"]["backbone"] == "resnet"  # rewritten whole
    # Without the defaults this is what --resume said: model.backbone: None -> 'resnet'.
    paths.config.write_text(json.dumps(saved))
    with pytest.raises(UserError, match="model.backbone: None -> 'resnet'"):
        prepare_run_dir(paths, config, resume=True)


def test_a_dataset_that_moved_resumes_but_other_data_does_not():
    """Where the data lies may change on --resume; what it is (the dataset's identity) may not."""
    from distill.run_dir import config_differences

    old = {"data": {"images": "/a/train", "ann": "/a/train.json", "val_images": "/a/val", "val_ann": "/a/val.json",
                    "subset_fraction": 1.0}, "dataset": {"num_images": 10, "ann_sha256": "x"}}
    moved = {"data": {"images": "/b/train", "ann": "/b/train.json", "val_images": "/b/val", "val_ann": "/b/val.json",
                      "subset_fraction": 1.0}, "dataset": {"num_images": 10, "ann_sha256": "x"}}
    assert config_differences(old, moved) == []
    other = {**moved, "dataset": {"num_images": 10, "ann_sha256": "y"}}
    assert config_differences(old, other) == ["dataset.ann_sha256: 'x' -> 'y'"]
