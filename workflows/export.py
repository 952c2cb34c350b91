"""`ldcache export`: a checkpoint as one ONNX or TorchScript file with GFL decoding and NMS inside
(detector/deploy.py), and FILE.json beside it (detector/exported.py reads it back).

ONNX: torch.onnx.export's dynamo exporter with a dynamic batch, height and width; the NMS custom
op ldcache::nms becomes ONNX's NonMaxSuppression through a custom translation (onnx_nms), so
onnxruntime runs the whole detector. TorchScript: the network traced (convolutions have no
data-dependent control flow; the trace follows any input size) inside the scripted decoding and
greedy NMS. Either file is run once on an example batch and compared with the PyTorch module
before it is kept, and both are written under temporary names and renamed together."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import param, validate_fields
from core.domains import Flag, OneOf, Range, Table
from core.errors import UserError
from core.paths import OutputPath
from data.views import DEFAULT_IMG_SCALE, PIXEL_MEAN, PIXEL_STD, SIZE_DIVISOR, Scale
from detector import agreement
from detector.checkpoint import (
    file_sha256,
    load_state_dict_strict,
    read_checkpoint,
    resolve_model_config,
    trained_img_scale,
)
from detector.deploy import DeployedDetector
from detector.exported import (
    FORMATS,
    INPUT_NAMES,
    INSTALL_HINT,
    SIDECAR_KIND,
    SIDECAR_VERSION,
    exported_meta,
    open_runner,
    recorded_category_ids,
    recorded_class_names,
    sidecar_path,
)
from detector.model import build_detector

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
# The example batch the export runs: two images on a canvas whose sides differ from each other, so
# that no size is taken for a constant (a dimension of 1 would be).
EXAMPLE_HW = ((160, 192), (150, 180))
CHECK_TOLERANCE = 1e-3  # px and score: the file against the module on the example batch (measured: ~3e-5)


@dataclass(frozen=True)
class ExportConfig:
    format: str = param("onnx", "onnx (run by onnxruntime; dynamic batch, height and width) or torchscript",
                        OneOf(*FORMATS))
    out: str | None = param(None, "file to write; FILE.json beside it describes inputs, outputs and classes",
                            OutputPath("file"), shown="CKPT with .onnx or .torchscript.pt")
    max_dets: int = param(100, "detections per image K: outputs are [N, K]; unused slots score 0 with label -1",
                          Range(1, 1000))
    score_thr: float = param(0.05, "pairs scoring at most this are dropped before NMS (0.05: the COCO test recipe)",
                             Range(0, 1, integer=False, high_open=True))
    iou_thr: float = param(0.6, "class-aware NMS suppresses a box overlapping a better one by more than this IoU",
                           Range(0, 1, integer=False))
    img_scale: tuple[int, int] | None = param(None, "keep-ratio resize target LONG,SHORT recorded for the runtime",
                                              Scale(), shown="the checkpoint's, else 1333,800")
    raw: bool = param(False, "also output the per-level class and box logit maps (what a cache holds)", Flag())
    arch: dict = param(help="architecture flags for checkpoints without a config", domain=Table(), factory=dict,
                       flag=False)

    def __post_init__(self):
        validate_fields(self, "export configuration")


def onnx_nms(boxes, scores, iou_thr: float, score_thr: float, max_per_class: int):
    """ldcache::nms in ONNX: NonMaxSuppression, whose contract the op follows (boxes [N, S, 4],
    scores [N, C, S] -> [M, 3] rows image, class, box)."""
    from onnxscript import opset18 as op

    return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[max_per_class]),
                                op.Constant(value_floats=[iou_thr]), op.Constant(value_floats=[score_thr]))


def output_names(num_levels: int, raw: bool) -> list[str]:
    maps = [f"{kind}_p{level + 3}" for kind in ("cls", "box") for level in range(num_levels)] if raw else []
    return ["boxes", "scores", "labels", *maps]


def export_onnx(module: DeployedDetector, example: tuple, path: Path, names: list[str]) -> None:
    batch, height, width = torch.export.Dim("N", min=1, max=4096), torch.export.Dim.AUTO, torch.export.Dim.AUTO
    dynamic = {"images": {0: batch, 2: height, 3: width}, "image_hw": {0: batch}}
    # The exporter's notes (torchvision's ops are not there to register, an empty attribute list
    # defaults to ints) say nothing to a user: its loggers are quiet while it runs.
    chatter = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in chatter]
    for log in chatter:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(path), dynamo=True, dynamic_shapes=dynamic, external_data=False,
                              input_names=list(INPUT_NAMES), output_names=names, verbose=False,
                              custom_translation_table={torch.ops.ldcache.nms.default: onnx_nms})
    finally:
        for log, level in zip(chatter, levels):
            log.setLevel(level)
    name_dynamic_sides(path)


def name_dynamic_sides(path: Path) -> None:
    """The exporter names the dynamic height and width s<k>: call them H and W, in the inputs and in
    every shape derived from them (a level's map is [N, C, ((H - 1)//8) + 1, ...])."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim  # images [N, 3, H, W]
    names = {dims[2].dim_param: "H", dims[3].dim_param: "W"}
    names.pop("", None)  # a side the exporter kept static
    if names:
        symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
        for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:  # (setting it on a fixed size would clear the size: one or the other)
                    dim.dim_param = symbol.sub(lambda m: names[m.group(1)], dim.dim_param)
        onnx.save(model, str(path))


def export_torchscript(module: DeployedDetector, example: tuple, path: Path) -> None:
    module.requires_grad_(False)  # outputs that need no torch.no_grad() around the call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes read as Python numbers: none is kept
        module.net = torch.jit.trace(module.net, example[0])
        torch.jit.script(module).save(str(path))


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UserError(f"export --format onnx needs {err.name}: {INSTALL_HINT}") from None


def check_file(path: Path, fmt: str, module: DeployedDetector, example: tuple) -> float:
    """The largest difference of the file's boxes and scores from the module's on the example. A
    detection without a counterpart that no threshold decision explains (detector/agreement.py), or
    a difference above CHECK_TOLERANCE, is a bug of the export, not the user's."""
    with torch.no_grad():
        expected = module(*example)
    got = open_runner(path, fmt, torch.device("cpu"))(*example)
    diff, problems = agreement.compare(got, expected, module.iou_thr, module.score_thr, CHECK_TOLERANCE)
    if problems:
        raise RuntimeError(f"the exported {fmt} file differs from the model on the example batch: {problems[0]}")
    return diff


def run_export(checkpoint: str, cfg: ExportConfig) -> dict:
    """Write cfg.out (or CKPT with the format's suffix) and its sidecar FILE.json.
    -> {"out", "sidecar", "format", "max_diff"}."""
    if exported_meta(checkpoint) is not None:
        raise UserError(f"{checkpoint} is an exported file already; export the checkpoint it came from")
    ckpt = read_checkpoint(checkpoint)
    model_cfg = resolve_model_config(ckpt, **cfg.arch)
    out = Path(cfg.out) if cfg.out else Path(checkpoint).with_suffix(SUFFIXES[cfg.format])
    if out.resolve() == Path(checkpoint).resolve():
        raise UserError(f"--out {out} is the checkpoint itself; write the export to another file")
    if cfg.format == "onnx":
        require_onnx()
    model = build_detector(model_cfg)
    load_state_dict_strict(model, ckpt["state_dict"], source=f"checkpoint {checkpoint}")
    module = DeployedDetector(model.eval(), model_cfg.strides, model_cfg.reg_max, model_cfg.num_classes, cfg.max_dets,
                              cfg.score_thr, cfg.iou_thr, raw=cfg.raw).eval()
    canvas = tuple(max(hw[i] for hw in EXAMPLE_HW) for i in (0, 1))
    example = (torch.randn(len(EXAMPLE_HW), 3, *canvas, generator=torch.Generator().manual_seed(0)),
               torch.tensor(EXAMPLE_HW, dtype=torch.long))
    scale = cfg.img_scale or trained_img_scale(ckpt)
    sidecar = {
        "kind": SIDECAR_KIND, "version": SIDECAR_VERSION, "format": cfg.format, "file": out.name,
        "inputs": {"images": "float32 [N, 3, H, W]: RGB resized keeping its ratio to fit img_scale, normalised by "
                             "mean and std, zero-padded bottom and right to multiples of pad_divisor",
                   "image_hw": "int64 [N, 2]: each image's (height, width) after the resize, before the padding"},
        "outputs": output_names(model_cfg.num_levels, cfg.raw),
        "output_shapes": {"boxes": "float32 [N, K, 4] x1, y1, x2, y2 in input pixels", "scores": "float32 [N, K]",
                          "labels": "int64 [N, K], 0-based class index", "maps": "cls [N, C, H/s, W/s] and box "
                          "[N, 4(reg_max+1), H/s, W/s] logits per level (stride s), with raw",
                          "torchscript": "returns (boxes, scores, labels, [cls maps], [box maps]); lists empty "
                                         "without raw"},
        "padding": {"score": 0.0, "label": -1, "box": [0.0, 0.0, 0.0, 0.0]},
        "transform": {"img_scale": list(scale or DEFAULT_IMG_SCALE),
                      "img_scale_from": "--img-scale" if cfg.img_scale else "checkpoint" if scale else "default",
                      "keep_ratio": True, "resize": "bilinear, half-pixel centres, no antialiasing, rounded to uint8",
                      "to_rgb": True, "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD), "pad_divisor": SIZE_DIVISOR,
                      "pad_value": 0.0},
        "num_classes": model_cfg.num_classes, "class_names": recorded_class_names(ckpt, model_cfg.num_classes),
        "category_ids": recorded_category_ids(ckpt, model_cfg.num_classes),
        "max_dets": cfg.max_dets, "score_thr": cfg.score_thr, "iou_thr": cfg.iou_thr, "nms_pre": module.nms_pre,
        "strides": list(model_cfg.strides), "reg_max": model_cfg.reg_max, "raw": cfg.raw, "model": model_cfg.to_dict(),
        "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), "torch": torch.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, tmp_side = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".json.tmp")
    try:
        if cfg.format == "onnx":
            export_onnx(module, example, tmp, sidecar["outputs"])
        else:
            export_torchscript(module, example, tmp)
        diff = check_file(tmp, cfg.format, module, example)
        tmp_side.write_text(json.dumps(sidecar, indent=2) + "\n")
        os.replace(tmp, out)
        os.replace(tmp_side, sidecar_path(out))
    finally:
        tmp.unlink(missing_ok=True)
        tmp_side.unlink(missing_ok=True)
    return {"out": out, "sidecar": sidecar_path(out), "format": cfg.format, "max_diff": diff}
