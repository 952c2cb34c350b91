"""detector/deploy.py and `ldcache export`: the module with decoding and NMS inside gives
postprocess's detections; its ONNX (onnxruntime) and TorchScript files give the module's, at two
batch sizes and canvas sizes, run without this project, and `evaluate` of an exported file gives the
checkpoint's detections on real images. Tolerances: boxes 2e-3 px (COCO results are rounded to
1e-3 px) plus 1e-5 relative, scores 1e-4, labels and counts exact."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.views import ViewSpec, plan_view
from detector import ModelConfig, build_detector, save_checkpoint
from detector.checkpoint import file_sha256
from detector.deploy import DeployedDetector
from detector.exported import open_runner
from detector.inference import EvalConfig, run_evaluate
from detector.postprocess import postprocess
from tests.conftest import TINY_MODEL
from workflows.export import ExportConfig, run_export

CLASS_NAMES = ["square", "disc", "triangle", "ring", "bar"]
# (canvas, each image's size before padding): two batch sizes and canvases, every image on its
# canvas (ceil to 32 is the canvas), sizes below the canvas so that clipping to them matters. At
# 256 x 320 the P3 level has 6,400 (location, class) pairs, most above 0.05: more than nms_pre.
BATCHES = [((160, 192), [(160, 192), (150, 180)]), ((256, 320), [(256, 320), (230, 300), (250, 289)]),
           ((64, 96), [(64, 70)])]
BOX_TOL, SCORE_TOL = 2e-3, 1e-4


def lively_detector(seed: int = 1):
    """A tiny GFL whose class scores spread around 0.5 (a fresh head scores 0.01 everywhere, under
    the threshold: no detection to compare), with the class names a training run records."""
    torch.manual_seed(seed)
    config = ModelConfig(num_classes=5, **TINY_MODEL)
    model = build_detector(config).eval()
    with torch.no_grad():
        model.bbox_head.gfl_cls.bias.normal_(0, 1)
    return model, config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One checkpoint and its ONNX export (with the raw maps) and TorchScript export."""
    root = tmp_path_factory.mktemp("export")
    model, config = lively_detector()
    ckpt = root / "lively.pt"
    save_checkpoint(ckpt, model, config, run_config={"dataset": {"class_names": CLASS_NAMES}})
    onnx = run_export(str(ckpt), ExportConfig(format="onnx", out=str(root / "lively.onnx"), raw=True))
    script = run_export(str(ckpt), ExportConfig(format="torchscript"))  # default out: beside the checkpoint
    return {"ckpt": ckpt, "model": model, "config": config, "onnx": onnx["out"], "torchscript": script["out"]}


def batch(canvas, sizes, seed=0):
    images = torch.randn(len(sizes), 3, *canvas, generator=torch.Generator().manual_seed(seed))
    return images, torch.tensor(sizes, dtype=torch.long)


def reference(model, images, image_hw):
    """postprocess's detections for images that are their own resized views (scale 1)."""
    records = [plan_view(i, tuple(hw), ViewSpec(False, (max(hw), min(hw))), model.config.strides)
               for i, hw in enumerate(image_hw.tolist())]
    assert all(r.resized_hw == tuple(hw) and r.padded_hw == tuple(images.shape[2:])
               for r, hw in zip(records, image_hw.tolist()))
    with torch.no_grad():
        return postprocess(*model(images), records, model.config.strides, model.config.reg_max)


def assert_same_detections(boxes, scores, labels, expected) -> float:
    """Outputs [N, K, ...] against postprocess's Detections per image; -> the largest box difference."""
    worst = 0.0
    for i, det in enumerate(expected):
        count = len(det.scores)
        assert int((labels[i] >= 0).sum()) == count  # the found ones come first, the padding after them
        assert (labels[i, count:] == -1).all() and (scores[i, count:] == 0).all() and (boxes[i, count:] == 0).all()
        assert torch.equal(labels[i, :count], det.labels)
        assert torch.allclose(scores[i, :count], det.scores, atol=SCORE_TOL, rtol=0)
        assert torch.allclose(boxes[i, :count], det.boxes, atol=BOX_TOL, rtol=1e-5)
        if count:
            worst = max(worst, float((boxes[i, :count] - det.boxes).abs().max()))
    return worst


def test_the_module_in_pytorch_gives_postprocess_detections():
    model, config = lively_detector(seed=2)
    module = DeployedDetector(model, config.strides, config.reg_max, config.num_classes).eval()
    for canvas, sizes in BATCHES:
        images, image_hw = batch(canvas, sizes)
        with torch.no_grad():
            boxes, scores, labels, cls_maps, box_maps = module(images, image_hw)
        expected = reference(model, images, image_hw)
        assert sum(len(d.scores) for d in expected) > 0  # something to compare
        assert boxes.shape == (len(sizes), 100, 4) and labels.dtype == torch.int64 and cls_maps == box_maps == []
        assert_same_detections(boxes, scores, labels, expected)
    # the last batch finds fewer than K, the second fills every slot of its first image: both paddings are seen
    full = reference(model, *batch(*BATCHES[1]))
    assert max(len(d.scores) for d in expected) < 100 == max(len(d.scores) for d in full)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_the_exported_file_gives_the_module_detections_at_any_batch_and_size(exported, fmt):
    run = open_runner(exported[fmt], fmt, torch.device("cpu"))
    for canvas, sizes in BATCHES:
        images, image_hw = batch(canvas, sizes, seed=3)
        boxes, scores, labels, *maps = run(images, image_hw)
        assert boxes.shape == (len(sizes), 100, 4) and scores.shape == labels.shape == (len(sizes), 100)
        worst = assert_same_detections(boxes, scores, labels, reference(exported["model"], images, image_hw))
        print(f"{fmt} {tuple(images.shape)}: max box difference {worst:.2e} px")
        if fmt == "onnx":  # exported with --raw: the per-level maps follow, as the model gives them
            with torch.no_grad():
                cls_maps, box_maps = exported["model"](images)
            assert len(maps) == 10
            for got, want in zip(maps, cls_maps + box_maps):
                assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)


def test_the_onnx_file_has_a_dynamic_batch_height_and_width(exported):
    import onnx

    graph = onnx.load(str(exported["onnx"])).graph
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in (*graph.input, *graph.output)}
    assert shapes["images"] == ["N", 3, "H", "W"] and shapes["image_hw"] == ["N", 2]
    assert shapes["boxes"] == ["N", 100, 4] and shapes["labels"] == ["N", 100]
    assert shapes["cls_p3"][:2] == ["N", 5] and "H" in shapes["cls_p3"][2] and "W" in shapes["cls_p3"][3]
    assert "NonMaxSuppression" in {node.op_type for node in graph.node}  # the NMS runs in onnxruntime


def test_the_sidecar_says_what_goes_in_and_what_comes_out(exported):
    meta = json.loads((exported["onnx"].parent / "lively.onnx.json").read_text())
    assert meta["format"] == "onnx" and meta["class_names"] == CLASS_NAMES and meta["max_dets"] == 100
    assert meta["checkpoint_sha256"] == file_sha256(exported["ckpt"])
    assert meta["transform"]["mean"] == [123.675, 116.28, 103.53] and meta["transform"]["pad_divisor"] == 32
    assert meta["transform"]["img_scale"] == [1333, 800] and meta["transform"]["img_scale_from"] == "default"
    assert meta["outputs"][:3] == ["boxes", "scores", "labels"] and meta["outputs"][3] == "cls_p3"
    assert (meta["score_thr"], meta["iou_thr"], meta["padding"]["label"]) == (0.05, 0.6, -1)
    script = json.loads((exported["torchscript"].parent / "lively.torchscript.pt.json").read_text())
    assert script["outputs"] == ["boxes", "scores", "labels"] and script["format"] == "torchscript"


def test_the_files_run_without_this_project(exported, tmp_path):
    """onnxruntime and torch.jit.load alone, from another folder: no ldcache code or op is needed."""
    images, image_hw = batch(*BATCHES[1], seed=4)
    np.save(tmp_path / "images.npy", images.numpy())
    np.save(tmp_path / "hw.npy", image_hw.numpy())
    script = f"""
import sys, numpy as np, onnxruntime, torch
assert "detector" not in sys.modules
images, hw = np.load("images.npy"), np.load("hw.npy")
session = onnxruntime.InferenceSession({str(exported["onnx"])!r}, providers=["CPUExecutionProvider"])
np.save("onnx.npy", session.run(["scores"], {{"images": images, "image_hw": hw}})[0])
module = torch.jit.load({str(exported["torchscript"])!r})
np.save("ts.npy", module(torch.from_numpy(images), torch.from_numpy(hw))[1].numpy())
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    expected = reference(exported["model"], images, image_hw)
    for name in ("onnx", "ts"):
        scores = np.load(tmp_path / f"{name}.npy")
        for i, det in enumerate(expected):
            assert np.allclose(scores[i, :len(det.scores)], det.scores.numpy(), atol=SCORE_TOL)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_evaluate_of_an_exported_file_gives_the_checkpoint_detections(exported, fmt, tiny_coco, tmp_path):
    # 100 px: the images (<= 96 px, not square) resize to sides that are no multiple of 32, so
    # clipping to the image, not the canvas, matters.
    data = DataConfig(images=str(tiny_coco["val_images"]), ann=str(tiny_coco["val_ann"]), img_scale=(100, 100))
    results = {}
    for name, path in (("ckpt", exported["ckpt"]), (fmt, exported[fmt])):
        out = tmp_path / f"{name}.json"
        run_evaluate(EvalConfig(checkpoint=str(path), out=str(out), data=data, workers=0, batch_size=2),
                     progress=False)
        results[name] = json.loads(out.read_text())
    ours, theirs = results["ckpt"], results[fmt]
    assert len(ours) == len(theirs) > 20
    assert [(r["image_id"], r["category_id"]) for r in ours] == [(r["image_id"], r["category_id"]) for r in theirs]
    boxes = np.array([r["bbox"] for r in ours]), np.array([r["bbox"] for r in theirs])
    assert np.allclose(*boxes, atol=BOX_TOL, rtol=1e-5), np.abs(boxes[0] - boxes[1]).max()
    assert np.allclose([r["score"] for r in ours], [r["score"] for r in theirs], atol=SCORE_TOL)
    print(f"evaluate {fmt}: max bbox difference {np.abs(boxes[0] - boxes[1]).max():.2e} px")
    metrics = [json.loads((tmp_path / f"{n}.metrics.json").read_text()) for n in ("ckpt", fmt)]
    assert metrics[1]["exported"] == fmt and metrics[0]["metrics"]["AP"] == pytest.approx(metrics[1]["metrics"]["AP"],
                                                                                           abs=1e-3)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch 2.13; it runs
def test_class_aware_nms_inside_matches_the_project_nms_on_crowded_boxes():
    """Many overlapping boxes of few classes: the scripted greedy NMS and the custom op keep the
    same boxes as detector/postprocess.py's batched_nms."""
    from detector.deploy import greedy_nms_keep
    from detector.postprocess import batched_nms

    g = torch.Generator().manual_seed(5)
    xy = torch.rand(400, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(400, 2, generator=g) * 30], dim=1)
    scores, labels = torch.rand(400, generator=g), torch.randint(0, 3, (400,), generator=g)
    expected = batched_nms(boxes, scores, labels, 0.6)
    scripted = torch.jit.script(greedy_nms_keep)
    keep = scripted(boxes, scores, labels, 0.6, 1000)
    assert sorted(keep.nonzero()[:, 0].tolist()) == sorted(expected.tolist()) and 3 < len(expected) < 400
    first = scripted(boxes, scores, labels, 0.6, 10)  # stopping at 10 kept: the best 10 of the full run
    assert sorted(first.nonzero()[:, 0].tolist()) == sorted(expected[:10].tolist())
    class_scores = torch.where(labels == torch.arange(3)[:, None], scores, torch.full_like(scores, -1.0))[None]
    selected = torch.ops.ldcache.nms(boxes[None], class_scores, 0.6, 0.0, 1000)  # [M, 3] image, class, box
    assert sorted(selected[:, 2].tolist()) == sorted(expected.tolist())
    assert (selected[:, 1] == labels[selected[:, 2]]).all()


def test_a_damaged_export_or_sidecar_is_named_for_what_is_wrong(exported, tmp_path):
    """Every way an exported file and its JSON can go wrong reads as one line naming which."""
    from core.errors import UserError
    from detector.exported import ExportedDetector, exported_meta

    onnx, script = Path(exported["onnx"]), Path(exported["torchscript"])
    sidecar = json.loads(Path(str(onnx) + ".json").read_text())
    cases = {  # file name -> (file bytes, sidecar text or None, what the message must say)
        "missing.onnx": (onnx.read_bytes(), None, "missing.onnx has no missing.onnx.json beside it"),
        "foreign.onnx": (onnx.read_bytes(), '{"a": 1}', "foreign.onnx.json is not the JSON `ldcache export` writes"),
        "broken.onnx": (onnx.read_bytes(), "{bad", "broken.onnx.json is not readable JSON"),
        "future.onnx": (onnx.read_bytes(), json.dumps({**sidecar, "version": 99}), "cannot run (version 99"),
        "cut.onnx": (onnx.read_bytes()[:5000], json.dumps(sidecar), "is not a loadable ONNX file"),
        "cut.pt": (script.read_bytes()[:5000], Path(str(script) + ".json").read_text(),
                   "not a loadable TorchScript file (PytorchStreamReader failed reading zip archive: failed finding "
                   "central directory); export it again"),
    }
    for name, (data, side, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        if side is not None:
            (tmp_path / f"{name}.json").write_text(side)
        with pytest.raises(UserError) as caught:
            exported_meta(tmp_path / name) if side is None or "JSON" in reason else ExportedDetector(
                tmp_path / name, torch.device("cpu"))
        assert reason in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
