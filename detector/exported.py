"""An exported detector (`ldcache export`: detector/deploy.py in one file) run the way `evaluate`
and `predict` run a checkpoint: ONNX through onnxruntime, TorchScript through torch.jit.load.

FILE.json, written beside FILE, is what makes it usable without this project: the input
transform, the inputs and outputs, the classes, K and the thresholds inside, the source
checkpoint's sha256. A file without it is not taken for an exported detector."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import torch

from core.errors import UserError, first_line
from data.views import ViewRecord, boxes_to_original
from detector.postprocess import Detections

SIDECAR_KIND = "ldcache.export"
SIDECAR_VERSION = 1
FORMATS = ("onnx", "torchscript")
INPUT_NAMES = ("images", "image_hw")
INSTALL_HINT = "pip install 'ldcache[export]' (onnx, onnxscript, onnxruntime)"


def sidecar_path(path) -> Path:
    return Path(str(path) + ".json")


def read_sidecar(path) -> dict | None:
    """FILE.json of an exported detector, or None when FILE has none (a checkpoint, say)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{side} is not readable JSON ({first_line(err)}); export {path} again") from None
    if not isinstance(meta, dict) or meta.get("kind") != SIDECAR_KIND:
        return None
    if meta.get("version") != SIDECAR_VERSION or meta.get("format") not in FORMATS:
        raise UserError(f"{side} describes an export this ldcache cannot run (version {meta.get('version')}, format "
                        f"{meta.get('format')}); export the checkpoint again with this version")
    return meta


def no_sidecar(path) -> str:
    """Why read_sidecar found none: no FILE.json, or one that `ldcache export` did not write."""
    side = sidecar_path(path)
    if side.is_file():
        return f"{path}'s {side.name} is not the JSON `ldcache export` writes"
    return f"{path} has no {side.name} beside it"


def is_torchscript(path) -> bool:
    """A TorchScript archive: a zip holding code/ (a torch.save checkpoint is a zip without it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def exported_meta(path) -> dict | None:
    """read_sidecar, and a UserError for an .onnx file without its sidecar (it is no checkpoint either)."""
    meta = read_sidecar(path)
    if meta is None and (Path(path).suffix.lower() == ".onnx" or is_torchscript(path)):
        raise UserError(f"{no_sidecar(path)}; keep the JSON `ldcache export` wrote beside the file (or export the "
                        "checkpoint again)")
    return meta


def recorded_class_names(ckpt: dict, num_classes: int) -> list[str] | None:
    """The class names one of our training runs recorded in its checkpoint (label order), if any."""
    names = ckpt.get("run_config", {}).get("dataset", {}).get("class_names")
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return names
    return None


def recorded_category_ids(ckpt: dict, num_classes: int) -> list[int] | None:
    """The dataset's category id of each label, as one of our training runs recorded it, if any."""
    ids = ckpt.get("run_config", {}).get("dataset", {}).get("category_ids")
    if isinstance(ids, list) and len(ids) == num_classes and all(isinstance(i, int) for i in ids):
        return ids
    return None


def category_ids_or_default(ids: list[int] | None, num_classes: int) -> list[int]:
    """The recorded category ids, or label + 1 (what a dataset numbered from 1 without gaps has)."""
    return list(ids) if ids else list(range(1, num_classes + 1))


def class_names_or_ids(names: list[str] | None, num_classes: int) -> list[str]:
    return list(names) if names else [f"class_{i}" for i in range(num_classes)]


def open_runner(path, fmt: str, device: torch.device):
    """The exported file as a function (images [N, 3, H, W], image_hw [N, 2]) -> its outputs
    [boxes, scores, labels, *maps] as CPU tensors."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"running the ONNX file {path} needs onnxruntime: {INSTALL_HINT}") from None
        wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
        providers = [p for p in wanted if p in onnxruntime.get_available_providers()] + ["CPUExecutionProvider"]
        try:
            session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as err:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise UserError(f"{path} is not a loadable ONNX file ({first_line(err)}); export it again") from None

        def run_onnx(images: torch.Tensor, image_hw: torch.Tensor) -> list[torch.Tensor]:
            feed = dict(zip(INPUT_NAMES, (images.float().cpu().numpy(), image_hw.long().cpu().numpy())))
            return [torch.from_numpy(o) for o in session.run(None, feed)]
        return run_onnx
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; it still runs
            module = torch.jit.load(str(path), map_location=device)
    except Exception as err:  # torch raises RuntimeError or a zip error for a file of another kind
        raise UserError(f"{path} is not a loadable TorchScript file ({first_line(err)}); export it again") from None

    @torch.no_grad()
    def run_torchscript(images: torch.Tensor, image_hw: torch.Tensor) -> list[torch.Tensor]:
        boxes, scores, labels, cls_maps, box_maps = module(images.float().to(device), image_hw.long().to(device))
        return [t.cpu() for t in (boxes, scores, labels, *cls_maps, *box_maps)]
    return run_torchscript


class ExportedDetector:
    """An exported file and its sidecar: detect(batch of one canvas, records) -> Detections in
    original image pixels, as postprocess gives them for a checkpoint."""

    def __init__(self, path, device: torch.device):
        meta = read_sidecar(path)
        if meta is None:
            raise UserError(f"{no_sidecar(path)}, so it is no exported detector; keep the JSON `ldcache export` "
                            "wrote beside the file, or pass a checkpoint")
        self.path, self.meta = Path(path), meta
        self.strides = tuple(meta["strides"])
        self.num_classes = int(meta["num_classes"])
        self.img_scale = tuple(meta["transform"]["img_scale"])
        self.class_names = class_names_or_ids(meta.get("class_names"), self.num_classes)
        self.category_ids = category_ids_or_default(meta.get("category_ids"), self.num_classes)
        self.run = open_runner(path, meta["format"], device)

    def detect(self, images: torch.Tensor, records: list[ViewRecord], score_thr: float = 0.0) -> list[Detections]:
        image_hw = torch.tensor([r.resized_hw for r in records], dtype=torch.long)  # [N, 2] before padding
        boxes, scores, labels = self.run(images, image_hw)[:3]  # [N, K, 4], [N, K], [N, K]
        if labels.numel() and int(labels.max()) >= self.num_classes:  # the JSON of another export
            raise UserError(f"{self.path} gives class index {int(labels.max())} but {sidecar_path(self.path).name} "
                            f"lists {self.num_classes} classes, so it describes another export; keep the JSON "
                            "written with this file (or export the checkpoint again)")
        results = []
        for i, record in enumerate(records):
            found = (labels[i] >= 0) & (scores[i] > score_thr)  # unused slots: label -1, score 0
            results.append(Detections(boxes_to_original(boxes[i][found].float(), record), scores[i][found].float(),
                                      labels[i][found].long()))
        return results
