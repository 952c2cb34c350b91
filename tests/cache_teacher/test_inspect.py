import json

import pytest
import zarr
from PIL import Image

from cache_teacher.inspect import format_summary, summarize
from cache_teacher.reader import CacheReader
from cache_teacher.verify import verify
from detector.config import ModelConfig
from tests.cli_runner import assert_user_error, run_cli


def test_summary_counts_what_was_dumped(tiny_cache):
    s = summarize(CacheReader(tiny_cache))
    assert (s["images"], s["views"], s["complete"]) == (10, 20, True)
    assert s["view_specs"] == ["orig@96x96", "hflip@96x96"]
    assert s["bytes_on_disk"]["box"] > 0 and s["bytes_on_disk"]["cls"] > 0
    assert s["bytes_per_view"] == pytest.approx(s["bytes_on_disk_total"] / 20)
    # 96 px canvases: 12x12 + 6x6 + 3x3 + 2x2 + 1x1 locations per view.
    assert [1, 1] in next(c["level_hw"] for c in s["canvases"] if c["padded_hw"] == [96, 96])


def test_verify_with_the_teacher_measures_fidelity(tiny_cache, tiny_teacher):
    r = verify(CacheReader(tiny_cache), str(tiny_teacher["path"]), num_views=4)
    assert r["ok"] and r["teacher_matches"] and r["dataset_matches"] and r["nonfinite_rows"] == 0
    assert r["fidelity"]["views"] == 4
    assert (
        abs(r["fidelity"]["kl_t10_mean"]) < 1e-5
    )  # fp16 storage of a fresh fp32 forward (float noise may dip below 0)


def test_verify_reports_an_incomplete_cache(tiny_cache, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_cache, copy)
    group = zarr.open_group(str(copy), mode="r+")
    group["progress"][0] = 0
    group.attrs["ldcache"] = {**group.attrs["ldcache"], "complete": False}
    r = verify(CacheReader(copy))
    assert not r["ok"] and any("incomplete" in p for p in r["problems"])
    proc = run_cli("inspect-cache", copy, "--verify")
    assert proc.returncode == 1 and "INCOMPLETE" in proc.stdout  # a failed check is a failed command


def test_cli_json_and_png(tiny_cache, tmp_path):
    proc = run_cli("inspect-cache", tiny_cache, "--json", "--png", tmp_path / "view.png", "--view", "3")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["summary"]["views"] == 20
    with Image.open(tmp_path / "view.png") as img:
        assert img.width > 600  # image panel + the four edge-distribution panels


def test_cli_errors(tiny_cache, tiny_coco, tiny_teacher, tmp_path):
    assert_user_error(run_cli("inspect-cache", tmp_path / "nothing"), "no cache at")
    assert_user_error(run_cli("inspect-cache", tiny_cache, "--png", tmp_path / "x.png", "--view", "99"), "out of range")
    base = ["dump-teacher", "--teacher", tiny_teacher["path"], "--images", tiny_coco["images"], "--ann",
            tiny_coco["ann"], "--img-scale", "96,96", "--workers", "0"]
    # An existing store of another identity (other views) is refused, naming the difference.
    assert_user_error(run_cli(*base, "--out", tiny_cache, "--views", "orig"), "another identity", "--overwrite")
    assert_user_error(run_cli(*base, "--out", tiny_cache, "--box-dtype", "int4"), "--box-dtype")
    (tmp_path / "file").write_text("x")
    assert_user_error(run_cli(*base, "--out", tmp_path / "file" / "c"), "not a writable folder")


def test_dump_with_a_corrupt_image_keeps_what_was_written(tiny_coco, tiny_teacher, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_coco["root"], data)
    images = sorted((data / "train").glob("*.png"))
    images[-1].write_bytes(b"garbage")  # read late in the dump
    args = ["dump-teacher", "--teacher", tiny_teacher["path"], "--images", data / "train", "--ann",
            data / "annotations" / "instances_train.json", "--img-scale", "96,96", "--workers", "1",
            "--out", tmp_path / "c", "--shard-mb", "0.05", "--batch-size", "1"]
    assert_user_error(run_cli(*args), "cannot be read")
    done = zarr.open_group(str(tmp_path / "c"), mode="r")["progress"][:]
    assert 0 < done.sum() < len(done)  # the shards before the bad image were kept
    shutil.copy(tiny_coco["images"] / images[-1].name, images[-1])  # fix the file, run again: it resumes
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert CacheReader(tmp_path / "c").complete


def test_the_summary_names_the_teacher_backbone(tiny_cache):
    s = summarize(CacheReader(tiny_cache))
    assert "GFL R-18 x0.125 width (5 classes" in format_summary(s)  # tiny_teacher: depth 18, base_width 8
    mobile = {**ModelConfig(num_classes=5, backbone="mobilenet_v2").to_dict(), "checkpoint_sha256": "0" * 64}
    teacher_line = next(line for line in format_summary({**s, "teacher": mobile}).splitlines() if "GFL" in line)
    assert "GFL mobilenet_v2 (5 classes" in teacher_line and "R-" not in teacher_line
    older = {k: v for k, v in s["teacher"].items() if k != "backbone"}  # a cache dumped before --backbone
    assert "GFL R-18 x0.125 width" in format_summary({**s, "teacher": older})


def test_the_picture_of_a_compact_cache_shows_stored_box_logits(tiny_coco, tiny_teacher, tmp_path, monkeypatch):
    """An ld+bckd cache has box logits at its region rows only (elsewhere a two-bin stand-in for the
    stored edges): the picture's distributions must be the teacher's, so a stored row's."""
    import cache_teacher.picture as picture
    from cache_teacher.inspect import render_png
    from tests.conftest import dump_tiny_cache

    cache = CacheReader(dump_tiny_cache(tiny_coco, tiny_teacher["path"], tmp_path / "c.zarr", img_scale=(160, 160),
                                        store_regions="ld+bckd", cls_topk=2))
    drawn = {}
    monkeypatch.setattr(picture, "render_view", lambda out, *args, **kw: drawn.update(edges=args[6]) or out)
    for v in range(len(cache.records)):
        render_png(cache, v, tmp_path / "v.png")
        stored = cache.read_view(v).box.reshape(-1, 4, 17).numpy()  # the view's stored box rows
        assert (abs(stored - drawn["edges"][None]) < 1e-6).all(axis=(1, 2)).any(), v
    s = summarize(cache)  # and the summary says what the regions hold
    stored_rows = sum(len(cache.read_view(v).box) for v in range(len(cache.records)))
    assert s["regions"]["kind"] == "ld+bckd" and s["regions"]["rows_stored"] == stored_rows
    line = next(line for line in format_summary(s).splitlines() if line.startswith("regions"))
    assert f"box logits at {stored_rows:,} of" in line and "the top 2 class logits + a floor" in line, line


def test_another_dataset_or_teacher_is_one_line(tiny_cache, tiny_coco, tmp_path):
    from detector import ModelConfig, build_detector, save_checkpoint
    from tests.conftest import TINY_MODEL

    val = ["--images", tiny_coco["val_images"], "--ann", tiny_coco["val_ann"]]  # 4 other images
    assert_user_error(run_cli("inspect-cache", tiny_cache, "--png", tmp_path / "x.png", "--view", "19", *val),
                      "is not in", "--images and --ann the cache was dumped from")
    assert not (tmp_path / "x.png").exists()
    config = ModelConfig(num_classes=7, **TINY_MODEL)
    save_checkpoint(tmp_path / "seven.pt", build_detector(config), config)  # a teacher of another dataset
    assert_user_error(run_cli("inspect-cache", tiny_cache, "--verify", "--teacher", tmp_path / "seven.pt"),
                      "classes 7 (the cache: 5)", "pass the teacher the cache was dumped with")


def test_verify_rebuilds_an_mmdetection_teacher_as_it_was_dumped(tiny_coco, tmp_path):
    """A checkpoint without a recorded architecture was dumped with the flags the weights cannot
    show (--gn-groups): --verify --teacher rebuilds it with the cache's, not the default 32."""
    import torch

    from detector import ModelConfig, build_detector
    from tests.conftest import TINY_MODEL, dump_tiny_cache

    torch.manual_seed(0)
    model = build_detector(ModelConfig(num_classes=5, **{**TINY_MODEL, "head_channels": 64, "gn_groups": 4}))
    torch.save({"meta": {}, "state_dict": model.state_dict()}, tmp_path / "gfl.pth")  # mmdetection's layout
    cache = CacheReader(dump_tiny_cache(tiny_coco, tmp_path / "gfl.pth", tmp_path / "c.zarr", arch={"gn_groups": 4}))
    report = verify(cache, str(tmp_path / "gfl.pth"), num_views=4, ap_images=0)
    assert report["ok"] and report["teacher_matches"]
    assert report["fidelity"]["kl_t10_max"] < 1e-6 and report["fidelity"]["cls_max_abs_err"] < 0.01  # fp16 storage


def test_an_incomplete_cache_shows_and_measures_only_written_views(tiny_cache, tiny_teacher, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_cache, copy)
    group = zarr.open_group(str(copy), mode="r+")
    group["progress"][0] = 0  # shard 0 never written: its rows are the fill value
    group.attrs["ldcache"] = {**group.attrs["ldcache"], "complete": False}
    for name in ("box", "cls"):
        shutil.rmtree(copy / name / "c" / "0")
    assert_user_error(run_cli("inspect-cache", copy, "--png", tmp_path / "x.png", "--view", "0"),
                      "--view 0 is not written yet", "re-run the same dump-teacher command")
    r = verify(CacheReader(copy), str(tiny_teacher["path"]), num_views=20)
    assert not r["ok"] and any("incomplete" in p for p in r["problems"])
    assert 0 < r["fidelity"]["views"] < 20 and r["fidelity"]["kl_t10_max"] < 1e-6  # the written views: fp16 storage


def test_a_dump_resumes_only_in_the_precision_that_began_it(tiny_coco, tiny_teacher, tiny_cache, tmp_path):
    """A bf16 dump (CUDA's default) resumed in fp32 would mix two arithmetics in one cache: refused
    in one line; a cache from before the precision was recorded resumes as before."""
    import shutil

    from core.errors import UserError
    from tests.conftest import dump_tiny_cache, store_array_files

    assert summarize(CacheReader(tiny_cache))["precision"] == "fp32"  # this CPU's
    assert "computed in fp32" in format_summary(summarize(CacheReader(tiny_cache)))
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_cache, copy)
    group = zarr.open_group(str(copy), mode="r+")
    group["progress"][0] = 0
    group.attrs["ldcache"] = {**group.attrs["ldcache"], "complete": False, "precision": "bf16"}
    before = store_array_files(copy)
    with pytest.raises(UserError, match="begun computing the teacher in bf16 and this run computes in fp32"):
        dump_tiny_cache(tiny_coco, tiny_teacher["path"], copy)
    assert store_array_files(copy) == before
    group.attrs["ldcache"] = {k: v for k, v in group.attrs["ldcache"].items() if k != "precision"}
    dump_tiny_cache(tiny_coco, tiny_teacher["path"], copy)
    assert CacheReader(copy).complete and store_array_files(copy) == store_array_files(tiny_cache)
