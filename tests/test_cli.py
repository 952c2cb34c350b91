"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

import json
import shutil

import pytest
import torch

from tests.cli_runner import assert_user_error, run_cli
from tests.conftest import TINY_MODEL_FLAGS


@pytest.fixture
def data_copy(tiny_coco, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_coco["root"], root)
    return root


def _train_args(root, out, *extra):
    return ["train-detector", "--images", root / "train", "--ann", root / "annotations" / "instances_train.json",
            "--img-scale", "96,96", "--out", out, "--workers", "0", *TINY_MODEL_FLAGS, *extra]


def test_train_then_evaluate_from_the_command_line(data_copy, tmp_path):
    proc = run_cli(*_train_args(data_copy, tmp_path / "run", "--max-iters", "2", "--batch-size", "4",
                                "--val-images", data_copy / "val", "--val-ann",
                                data_copy / "annotations" / "instances_val.json"))
    assert proc.returncode == 0, proc.stderr
    assert "AP50" in proc.stdout  # the evaluation table is printed at the end
    num_images = json.loads((tmp_path / "run" / "config.json").read_text())["dataset"]["num_images"]
    assert f"instances_train.json ({num_images} images) ->" in proc.stdout  # what the run trains on
    proc = run_cli("evaluate", "--checkpoint", tmp_path / "run" / "checkpoints" / "last.pt", "--images",
                   data_copy / "val", "--ann", data_copy / "annotations" / "instances_val.json",
                   "--out", tmp_path / "res.json", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "res.metrics.json").read_text())
    assert metrics["img_scale"] == [96, 96]  # the scale the checkpoint was trained at, from its run config
    assert set(metrics["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_evaluate_an_mmdet_checkpoint(data_copy, tmp_path, mmdet_fixture):
    path = tmp_path / "mmdet_gfl.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": mmdet_fixture["cases"]["r18_small"]["state_dict"]},
               path)
    args = ["evaluate", "--checkpoint", path, "--images", data_copy / "val", "--ann",
            data_copy / "annotations" / "instances_val.json", "--out", tmp_path / "res.json", "--workers", "0",
            "--img-scale", "96,96"]
    proc = run_cli(*args, "--gn-groups", "8")  # architecture read off the weights; GN groups given
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "res.metrics.json").read_text())["model"]["depth"] == 18
    assert_user_error(run_cli(*args, "--gn-groups", "8", "--depth", "50"), "does not fit the model", "missing keys")


def test_missing_image_file(data_copy, tmp_path):
    next((data_copy / "train").glob("*.png")).unlink()
    assert_user_error(run_cli(*_train_args(data_copy, tmp_path / "run")), "not found", "check the images directory")


def test_corrupt_image_file_inside_a_loader_worker(data_copy, tmp_path):
    for png in (data_copy / "train").glob("*.png"):
        png.write_bytes(b"not a png")
    proc = run_cli(*_train_args(data_copy, tmp_path / "run", "--workers", "1", "--max-iters", "1"))
    assert_user_error(proc, "cannot be read")


def test_malformed_annotation_file(data_copy, tmp_path):
    (data_copy / "annotations" / "instances_train.json").write_text('{"images": [')
    assert_user_error(run_cli(*_train_args(data_copy, tmp_path / "run")), "instances_train.json")


def test_unknown_category(data_copy, tmp_path):
    path = data_copy / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(coco))
    assert_user_error(run_cli(*_train_args(data_copy, tmp_path / "run")), "category_id 99")


def test_checkpoint_of_another_architecture(data_copy, tmp_path):
    assert run_cli(*_train_args(data_copy, tmp_path / "run", "--max-iters", "1")).returncode == 0
    proc = run_cli("evaluate", "--checkpoint", tmp_path / "run" / "checkpoints" / "last.pt", "--depth", "50",
                   "--images", data_copy / "val", "--ann", data_copy / "annotations" / "instances_val.json",
                   "--out", tmp_path / "res.json")
    assert_user_error(proc, "depth=18 (given 50)")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    proc = run_cli("evaluate", "--checkpoint", tmp_path / "junk.pt", "--images", data_copy / "val", "--ann",
                   data_copy / "annotations" / "instances_val.json")
    assert_user_error(proc, "not a readable torch checkpoint")


def test_bad_option_values(data_copy, tmp_path):
    assert_user_error(run_cli(*_train_args(data_copy, tmp_path / "run", "--img-scale", "96")), "--img-scale")
    assert_user_error(run_cli(*_train_args(data_copy, tmp_path / "run", "--depth", "19")), "depth must be one of")
    assert_user_error(run_cli(*_train_args(data_copy, tmp_path / "run", "--batch-size", "0")), "--batch-size", "got 0")


def test_toml_config_with_typed_flags_winning(data_copy, tmp_path):
    config = tmp_path / "recipe.toml"
    config.write_text('[train]\nbatch_size = 5\nlr = 0.003\nmax_iters = 1\n[model]\nstacked_convs = 2\n')
    proc = run_cli(*_train_args(data_copy, tmp_path / "run", "--config", config, "--lr", "0.004"))
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["train"]["batch_size"] == 5  # from the file
    assert resolved["train"]["lr"] == 0.004  # the typed flag wins over the file
    assert resolved["model"]["stacked_convs"] == 1  # TINY_MODEL_FLAGS types --stacked-convs 1
    config.write_text("[train]\nbogus = 1\n")
    assert_user_error(run_cli(*_train_args(data_copy, tmp_path / "run2", "--config", config)), "bogus")


@pytest.mark.parametrize("entry", ["ldcache", "cli.py"])
def test_user_errors_of_the_installed_command_and_the_checkout_alike(entry, tmp_path):
    """What a new user types from the README: one line, exit 2, no traceback, whichever entry point."""
    proc = run_cli("train-student", "--out", tmp_path / "r", entry=entry)
    assert_user_error(proc, "give exactly one of --cache", "--teacher")
    proc = run_cli("evaluate", "--checkpoint", tmp_path / "missing.pt", entry=entry)
    assert_user_error(proc, "missing.pt does not exist")
    (tmp_path / "folder").mkdir()
    assert_user_error(run_cli("inspect-cache", tmp_path / "folder", entry=entry), "no cache at", "dump-teacher")


@pytest.mark.parametrize("given, missing", [("--val-images", "--val-ann"), ("--val-ann", "--val-images")])
def test_half_a_validation_pair_is_refused_naming_the_missing_half(data_copy, tmp_path, given, missing):
    """Never completed from the synthetic data (which would pair a user's images with synthetic
    annotations): an error before anything is read or written, the synthetic default included."""
    value = data_copy / ("val" if given == "--val-images" else "annotations/instances_val.json")
    home = tmp_path / "home"
    for args in (["train-detector", given, value, "--out", tmp_path / "a"],  # the synthetic default otherwise
                 [*_train_args(data_copy, tmp_path / "b"), given, value]):
        proc = run_cli(*args, env_home=home)
        assert_user_error(proc, f"{given} was given without {missing}")
        assert not home.exists() and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cross_field_and_toml_values_are_refused_before_anything_is_written(data_copy, tmp_path):
    home = tmp_path / "home"
    # gn_groups must divide the head's channels (a GroupNorm of 16 channels in 3 groups cannot be built)
    proc = run_cli("train-detector", "--gn-groups", "3", "--head-channels", "16", "--out", tmp_path / "a",
                   env_home=home)
    assert_user_error(proc, "head_channels (16) must be a multiple of gn_groups (3)")
    config = tmp_path / "recipe.toml"
    config.write_text("[loss]\nld_weight = -1\n")  # an integer: once slipped past the float-only range check
    proc = run_cli("train-student", "--cache", tmp_path, "--config", config, "--out", tmp_path / "a", env_home=home)
    assert_user_error(proc, "[loss] ld_weight must be a number in [0, 10000], got -1")
    assert proc.stderr.rstrip().endswith("got -1"), proc.stderr  # quoted as written, not as -1.0
    assert not home.exists() and not (tmp_path / "a").exists()


@pytest.mark.parametrize("extra", ["96,96", "80,64;80,64"])
def test_an_extra_scale_given_twice_is_refused_before_anything_is_written(data_copy, tmp_path, tiny_teacher, extra):
    proc = run_cli("dump-teacher", "--teacher", tiny_teacher["path"], "--images", data_copy / "train", "--ann",
                   data_copy / "annotations" / "instances_train.json", "--img-scale", "96,96", "--extra-scales", extra,
                   "--out", tmp_path / "c.zarr")
    assert_user_error(proc, "--extra-scales", "repeats a scale")
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_ctrl_c_says_whether_there_is_progress_to_resume(monkeypatch, tmp_path, checkpointed):
    import typer.testing

    import cli
    import workflows.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflows.train, "run_training", interrupted)
    out = tmp_path / "run"
    if checkpointed:
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "last.pt").write_bytes(b"")
    result = typer.testing.CliRunner().invoke(cli.app, ["train-detector", "--out", str(out)])
    assert result.exit_code == 130
    said = "progress saved" if checkpointed else "nothing to resume"
    assert said in result.output, result.output
