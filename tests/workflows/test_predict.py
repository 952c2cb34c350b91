"""`ldcache predict` on image files and folders, from a checkpoint and from its ONNX export: the
results evaluate gives, in original pixels, with file and class names; pictures; unreadable images
skipped and named; bad input refused in one line with nothing written."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import DataConfig
from detector import save_checkpoint
from detector.inference import EvalConfig, run_evaluate
from tests.cli_runner import assert_user_error, run_cli
from tests.detector.test_export import BOX_TOL, CLASS_NAMES, SCORE_TOL, lively_detector
from workflows.predict import PredictConfig, run_predict

SCALE = "100,100"  # the tiny images (<= 96 px, not square) resize to sides that are no multiple of 32


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """A checkpoint whose scores spread around 0.5 (with class names) and its ONNX export, made by
    the installed command."""
    root = tmp_path_factory.mktemp("predict")
    model, config = lively_detector()
    ckpt = root / "lively.pt"
    save_checkpoint(ckpt, model, config, run_config={"dataset": {"class_names": CLASS_NAMES}})
    proc = run_cli("export", ckpt, "--format", "onnx", "--out", root / "lively.onnx", "--img-scale", SCALE)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (root / "lively.onnx.json").is_file()
    return {"ckpt": ckpt, "onnx": root / "lively.onnx"}


def read(out):
    return {name: json.loads((out / f"{name}.json").read_text()) for name in ("detections", "images", "config")}


def test_predict_writes_coco_results_in_original_pixels_with_names_and_pictures(lively, tiny_coco, tmp_path):
    out = tmp_path / "pred"
    proc = run_cli("predict", lively["ckpt"], tiny_coco["val_images"], "--out", out, "--img-scale", SCALE, "--draw",
                   "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    got = read(out)
    files = sorted(tiny_coco["val_images"].glob("*.png"))
    assert [im["file_name"] for im in got["images"]] == [str(f) for f in files]
    for im, path in zip(got["images"], files):
        with Image.open(path) as image:
            assert (im["width"], im["height"]) == image.size
    dets = got["detections"]
    assert len(dets) > 20 and set(dets[0]) == {"image_id", "file_name", "category_id", "category_name", "bbox", "score"}
    assert all(d["category_name"] == CLASS_NAMES[d["category_id"] - 1] and d["score"] > 0.05 for d in dets)
    # The same detections as evaluate on the same images: the same pipeline, in original pixels (the
    # synthetic images' ids follow their sorted file names, their category ids are label + 1).
    data = DataConfig(images=str(tiny_coco["val_images"]), ann=str(tiny_coco["val_ann"]), img_scale=(100, 100))
    run_evaluate(EvalConfig(checkpoint=str(lively["ckpt"]), out=str(tmp_path / "eval.json"), data=data, workers=0),
                 progress=False)
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert [(d["image_id"], d["category_id"], d["bbox"], d["score"]) for d in dets] == [
        (d["image_id"], d["category_id"], d["bbox"], d["score"]) for d in evaluated]
    pictures = sorted((out / "draw").iterdir())
    assert len(pictures) == len(files) and pictures[0].name == f"000001_{files[0].stem}.jpg"
    with Image.open(pictures[0]) as picture, Image.open(files[0]) as image:
        assert picture.size == image.size and np.abs(np.asarray(picture, dtype=float)
                                                     - np.asarray(image.convert("RGB"), dtype=float)).max() > 100
    assert (out / "skipped.txt").read_text() == ""
    assert f"{len(dets)} detections on {len(files)} images" in proc.stdout


def test_predict_with_the_onnx_export_gives_the_checkpoint_detections(lively, tiny_coco, tmp_path):
    ours = run_predict(str(lively["ckpt"]), [str(tiny_coco["val_images"])],
                       PredictConfig(out=str(tmp_path / "ckpt"), img_scale=(100, 100), workers=0), progress=False)
    theirs = run_predict(str(lively["onnx"]), [str(tiny_coco["val_images"])],  # the scale from the sidecar
                         PredictConfig(out=str(tmp_path / "onnx"), workers=0), progress=False)
    assert ours["detections"] == theirs["detections"] > 20 and theirs["notes"] == []
    a, b = read(tmp_path / "ckpt")["detections"], read(tmp_path / "onnx")["detections"]
    assert [(d["image_id"], d["category_name"]) for d in a] == [(d["image_id"], d["category_name"]) for d in b]
    boxes = np.array([d["bbox"] for d in a]), np.array([d["bbox"] for d in b])
    assert np.allclose(*boxes, atol=BOX_TOL, rtol=1e-5)
    assert np.allclose([d["score"] for d in a], [d["score"] for d in b], atol=SCORE_TOL)
    assert read(tmp_path / "onnx")["config"]["img_scale"] == [100, 100]


def test_results_carry_the_dataset_category_ids_a_training_run_recorded(tiny_coco, tmp_path):
    """COCO's ids have gaps (1..90 for 80 classes): a results file must use the dataset's id of each
    label, which training records beside the class names; export passes it on in the sidecar."""
    model, config = lively_detector()
    ids = [3, 8, 13, 21, 90]
    ckpt = tmp_path / "ids.pt"
    save_checkpoint(ckpt, model, config, run_config={"dataset": {"class_names": CLASS_NAMES, "category_ids": ids}})
    run_predict(str(ckpt), [str(tiny_coco["val_images"])],
                PredictConfig(out=str(tmp_path / "pred"), img_scale=(100, 100), workers=0), progress=False)
    dets = read(tmp_path / "pred")["detections"]
    assert len({d["category_id"] for d in dets}) > 1 and {d["category_id"] for d in dets} <= set(ids)
    assert all(d["category_name"] == CLASS_NAMES[ids.index(d["category_id"])] for d in dets)
    proc = run_cli("export", ckpt, "--format", "torchscript", "--out", tmp_path / "ids.pt.ts", "--img-scale", SCALE)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "ids.pt.ts.json").read_text())["category_ids"] == ids


def test_score_threshold_and_the_checkpoint_scale(tiny_coco, tmp_path):
    model, config = lively_detector()
    ckpt = tmp_path / "scaled.pt"
    save_checkpoint(ckpt, model, config, run_config={"data": {"img_scale": [64, 64]}})  # a run trained at 64 px
    images = [str(p) for p in sorted(tiny_coco["val_images"].glob("*.png"))[:2]]
    low = run_predict(str(ckpt), images, PredictConfig(out=str(tmp_path / "low"), workers=0), progress=False)
    high = run_predict(str(ckpt), images, PredictConfig(out=str(tmp_path / "high"), score_thr=0.6, workers=0),
                       progress=False)
    got = read(tmp_path / "high")
    assert 0 < high["detections"] < low["detections"] and all(d["score"] > 0.6 for d in got["detections"])
    assert got["config"]["img_scale"] == [64, 64]  # the checkpoint's recorded scale, not 1333,800
    names = {d["category_name"] for d in got["detections"]}  # the checkpoint records no class names
    assert names <= {f"class_{i}" for i in range(5)} and len(names) > 1


def test_unreadable_images_are_skipped_and_named_not_the_end_of_the_run(lively, tiny_coco, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    good = sorted(tiny_coco["val_images"].glob("*.png"))
    shutil.copy(good[0], folder / "a.png")
    shutil.copy(good[1], folder / "sub" / "c.png")  # found recursively
    (folder / "b_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # its header cannot be read
    data = good[2].read_bytes()
    (folder / "b_truncated.png").write_bytes(data[: len(data) // 2])  # its header reads, its pixels do not
    (folder / "notes.txt").write_text("not an image")  # no image suffix: not taken
    out = tmp_path / "pred"
    proc = run_cli("predict", lively["ckpt"], folder, "--out", out, "--img-scale", SCALE, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("skipped 2 unreadable image(s)") and "b_broken.jpg" in last and "b_truncated.png" in last
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == [str(folder / "b_broken.jpg"), str(folder / "b_truncated.png")]
    got = read(out)
    assert [(im["id"], im["file_name"]) for im in got["images"]] == [(1, str(folder / "a.png")),
                                                                     (4, str(folder / "sub" / "c.png"))]
    assert {d["image_id"] for d in got["detections"]} == {1, 4}


@pytest.mark.parametrize("case", ["missing input", "empty folder", "not an image", "not a checkpoint"])
def test_bad_predict_input_is_one_line_and_nothing_written(tiny_teacher, tiny_coco, tmp_path, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"no checkpoint")
    (tmp_path / "notes.txt").write_text("x")
    ckpt, inputs, fragment = {
        "missing input": (tiny_teacher["path"], tmp_path / "nowhere", "does not exist"),
        "empty folder": (tiny_teacher["path"], tmp_path / "empty", "holds no images"),
        "not an image": (tiny_teacher["path"], tmp_path / "notes.txt", "is not an image file"),
        "not a checkpoint": (tmp_path / "junk.pt", tiny_coco["val_images"], "not a readable torch checkpoint"),
    }[case]
    assert_user_error(run_cli("predict", ckpt, inputs, "--out", tmp_path / "out", "--workers", "0"), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["not a checkpoint", "unknown format", "an export already"])
def test_bad_export_input_is_one_line_and_nothing_written(lively, tmp_path, case):
    (tmp_path / "junk.pt").write_bytes(b"no checkpoint")
    args, fragment = {
        "not a checkpoint": ([tmp_path / "junk.pt"], "not a readable torch checkpoint"),
        "unknown format": ([lively["ckpt"], "--format", "tflite"], "--format must be one of onnx, torchscript"),
        "an export already": ([lively["onnx"]], "is an exported file already"),
    }[case]
    assert_user_error(run_cli("export", *args, "--out", tmp_path / "m.onnx"), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt"]


def test_the_tensor_layout_of_an_exported_batch_is_what_the_sidecar_says(lively):
    """K rows per image, padded with score 0 and label -1 (the sidecar's padding)."""
    from detector.exported import ExportedDetector

    detector = ExportedDetector(lively["onnx"], torch.device("cpu"))
    boxes, scores, labels = detector.run(torch.zeros(2, 3, 64, 64), torch.tensor([[64, 64], [40, 64]]))[:3]
    padding = detector.meta["padding"]
    assert boxes.shape == (2, detector.meta["max_dets"], 4) and labels.dtype == torch.int64
    empty = labels == padding["label"]
    assert (scores[empty] == padding["score"]).all() and (scores[~empty] > detector.meta["score_thr"]).all()


def test_a_16_bit_grey_png_is_read_as_its_8_bit_image_not_white(tmp_path):
    """A 16-bit PNG opens as I;16; PIL's convert("RGB") clips every value above 255 to white."""
    from data.views import ViewSpec, plan_view
    from workflows.predict import ImageFiles

    grey = np.random.default_rng(0).integers(0, 256, (40, 56), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # v * 257: high byte v
    with Image.open(tmp_path / "g16.png") as image:
        assert image.mode.startswith("I")
    record = plan_view(1, grey.shape, ViewSpec(False, (64, 64)), (8, 16, 32, 64, 128))
    files = ImageFiles([tmp_path / "g8.png", tmp_path / "g16.png"], [record, record])
    (_, eight, why8), (_, sixteen, why16) = files[0], files[1]
    assert why8 is None and why16 is None and torch.equal(eight, sixteen)


def test_a_rerun_into_an_out_inside_the_input_folder_does_not_take_its_own_pictures(lively, tiny_coco, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(sorted(tiny_coco["val_images"].glob("*.png"))[0], folder / "a.png")
    cfg = PredictConfig(out=str(folder / "pred"), img_scale=(100, 100), draw=True, workers=0)
    for _ in range(2):
        assert run_predict(str(lively["ckpt"]), [str(folder)], cfg, progress=False)["images"] == 1
    assert [im["file_name"] for im in read(folder / "pred")["images"]] == [str(folder / "a.png")]
    assert [p.name for p in (folder / "pred" / "draw").iterdir()] == ["000001_a.jpg"]
    # The pictures themselves, asked for by their folder, are still inputs.
    got = run_predict(str(lively["ckpt"]), [str(folder / "pred" / "draw")],
                      PredictConfig(out=str(tmp_path / "again"), img_scale=(100, 100), workers=0), progress=False)
    assert got["images"] == 1


def test_an_out_holding_another_commands_config_is_refused_and_kept(lively, tiny_coco, tmp_path):
    run = tmp_path / "run"  # a training run's folder: its config.json is what --resume reads
    run.mkdir()
    (run / "config.json").write_text('{"data": {}, "model": {}}\n')
    proc = run_cli("predict", lively["ckpt"], tiny_coco["val_images"], "--out", run, "--workers", "0")
    assert_user_error(proc, f"--out {run} holds a config.json that predict did not write")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert (run / "config.json").read_text() == '{"data": {}, "model": {}}\n'


def test_an_image_with_a_long_file_name_gets_its_picture(lively, tiny_coco, tmp_path):
    """draw/ID_NAME.jpg adds 11 bytes to the name: a 250-byte name would be too long to write."""
    folder = tmp_path / "long"
    folder.mkdir()
    name = "x" * 246 + ".png"
    shutil.copy(sorted(tiny_coco["val_images"].glob("*.png"))[0], folder / name)
    got = run_predict(str(lively["ckpt"]), [str(folder)],
                      PredictConfig(out=str(tmp_path / "pred"), img_scale=(100, 100), draw=True, workers=0),
                      progress=False)
    assert got["images"] == 1
    assert [p.name for p in (tmp_path / "pred" / "draw").iterdir()] == ["000001_" + "x" * 200 + ".jpg"]


def test_a_sidecar_of_another_export_is_one_line(lively, tiny_coco, tmp_path):
    """FILE.json describing fewer classes than FILE gives (copied from another export)."""
    shutil.copy(lively["onnx"], tmp_path / "m.onnx")
    meta = json.loads((lively["onnx"].parent / "lively.onnx.json").read_text())
    (tmp_path / "m.onnx.json").write_text(json.dumps({**meta, "num_classes": 2, "class_names": None,
                                                      "category_ids": None}))
    proc = run_cli("predict", tmp_path / "m.onnx", tiny_coco["val_images"], "--out", tmp_path / "out", "--workers", "0")
    assert_user_error(proc, "m.onnx.json lists 2 classes", "describes another export")


def test_evaluate_refuses_a_dataset_of_other_categories_than_the_checkpoint_learnt(tiny_coco, tmp_path):
    """A label indexes the dataset's sorted categories: other categories would score each class as
    another. The same classes numbered otherwise are fine (labels map through the file's ids)."""
    from core.errors import UserError

    doc = json.loads(Path(tiny_coco["val_ann"]).read_text())
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    model, config = lively_detector()
    assert config.num_classes == len(cats)
    ckpt = tmp_path / "recorded.pt"
    save_checkpoint(ckpt, model, config, run_config={"dataset": {"class_names": [c["name"] for c in cats],
                                                                 "category_ids": [c["id"] for c in cats]}})
    renumbered = {c["id"]: c["id"] + 100 for c in cats}
    for renamed in (False, True):
        other = {**doc, "categories": [{**c, "id": renumbered[c["id"]], "name": c["name"] + ("_x" if renamed else "")}
                                       for c in cats],
                 "annotations": [{**a, "category_id": renumbered[a["category_id"]]} for a in doc["annotations"]]}
        ann = tmp_path / f"val-{renamed}.json"
        ann.write_text(json.dumps(other))
        data = DataConfig(images=str(tiny_coco["val_images"]), ann=str(ann), img_scale=(100, 100))
        cfg = EvalConfig(checkpoint=str(ckpt), out=str(tmp_path / f"eval-{renamed}.json"), data=data, workers=0)
        if renamed:
            with pytest.raises(UserError, match=r"was trained on the categories .* but .*val-True\.json has .*_x"):
                run_evaluate(cfg, progress=False)
            assert not (tmp_path / "eval-True.json").exists()
        else:
            assert run_evaluate(cfg, progress=False)["images"] == len(doc["images"])


def test_a_rerun_replaces_the_earlier_pictures_and_an_interrupted_one_keeps_them(lively, tiny_coco, tmp_path,
                                                                                   monkeypatch):
    import workflows.predict as predict
    files = sorted(tiny_coco["val_images"].glob("*.png"))
    out, mine = tmp_path / "pred", tmp_path / "pred" / "draw" / "notes.txt"
    cfg = PredictConfig(out=str(out), img_scale=(100, 100), draw=True, workers=0)
    run_predict(str(lively["ckpt"]), [str(f) for f in files[:3]], cfg, progress=False)
    mine.write_text("a user's file")
    assert len(earlier := sorted(p.name for p in (out / "draw").iterdir())) == 4

    results, draw = read(out), predict.draw_picture

    def crash(*args):  # Ctrl-C after the second run's first picture
        draw(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "draw_picture", crash)
    with pytest.raises(KeyboardInterrupt):
        run_predict(str(lively["ckpt"]), [str(f) for f in files[3:5]], cfg, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "draw").iterdir() if p.is_file()) == earlier and read(out) == results

    run_predict(str(lively["ckpt"]), [str(files[3])], cfg, progress=False)  # one other image
    assert sorted(p.name for p in (out / "draw").iterdir()) == ["000001_" + files[3].stem + ".jpg", "notes.txt"]
    run_predict(str(lively["ckpt"]), [str(files[0])], PredictConfig(out=str(out), img_scale=(100, 100), workers=0),
                progress=False)  # no --draw: no picture of older results is left
    assert [p.name for p in (out / "draw").iterdir()] == ["notes.txt"] and mine.read_text() == "a user's file"
