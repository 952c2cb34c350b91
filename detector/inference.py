"""Run a detector over a dataset and score it with COCO metrics (`ldcache evaluate`: EvalConfig,
run_evaluate).

Images are batched only with others of the same padded canvas, because GroupNorm in the head
normalises over the whole canvas: a batch of equal canvases gives every image exactly the result
it would get alone (mmdetection tests one image at a time). An exported detector (`ldcache
export`, detector/exported.py) is evaluated the same way; its decoding and NMS run in the file."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from core import distributed
from core.config import check, param, validate_fields
from core.domains import Nested, OneOf, Range, Table
from core.errors import UserError
from core.paths import InputFile, OutputPath
from core.runtime import AMP_MODES, Device, autocast_for, progress_bar, resolve_device
from data.coco import CocoDetection, collate
from data.config import DataConfig
from data.views import ViewRecord, ViewSpec
from detector.checkpoint import load_state_dict_strict, read_checkpoint, resolve_model_config, trained_img_scale
from detector.evaluation import coco_evaluate, detections_to_coco, save_results
from detector.exported import ExportedDetector, exported_meta, recorded_category_ids, recorded_class_names
from detector.model import build_detector
from detector.postprocess import PostprocessConfig, postprocess


def canvas_batches(records: list[ViewRecord], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches whose members share one padded size (order kept in a group)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[record.padded_hw].append(i)
    return [idx[s:s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


def coco_detections(outputs, strides, reg_max: int, label_to_cat_id, cfg: PostprocessConfig = PostprocessConfig(),
                    ) -> dict[str, list[dict]]:
    """The one path from head outputs to COCO results, whatever produced them (a model, a cache's
    rows, a teacher's boxes with a student's scores): outputs yields (view records, {name: (class
    maps, box maps)}) per batch; -> {name: COCO result dicts in original image pixels, sorted by
    image id (stable: each image's detections stay in score order)}."""
    results: dict[str, list[dict]] = {}
    for records, maps in outputs:
        for name, (cls_maps, box_maps) in maps.items():
            for record, det in zip(records, postprocess(cls_maps, box_maps, records, strides, reg_max, cfg)):
                results.setdefault(name, []).extend(detections_to_coco(
                    record.image_id, det.boxes.cpu(), det.scores.cpu(), det.labels.cpu(), label_to_cat_id))
    return {name: sorted(r, key=lambda d: d["image_id"]) for name, r in results.items()}


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 1,
                    workers: int = 0, amp: str = "auto", cfg: PostprocessConfig = PostprocessConfig(),
                    progress: bool = True, share: tuple[int, int] = (0, 1)) -> list[dict]:
    """Detections of view 0 of the images of this share (rank, world size: every world-size-th
    image from rank on) as COCO result dicts in original image pixels, sorted by image id. model:
    a GFL module, or an ExportedDetector (which applies its own thresholds, not cfg's)."""
    exported = isinstance(model, ExportedDetector)
    if not exported:
        model.eval()
    rank, world = share
    indices = list(range(rank, len(dataset), world))
    records = [dataset.view_record(i, 0) for i in indices]
    batches = [[(indices[i], 0) for i in b] for b in canvas_batches(records, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")

    def outputs():
        for batch in loader:
            with autocast_for(device, amp):
                yield batch.records, {"model": model(batch.images.to(device, non_blocking=True))}
            bar.update(len(batch.records))

    with progress_bar(total=len(indices), desc="evaluate", unit="img", disable=not progress, leave=False) as bar:
        if exported:
            return exported_detections(model, loader, bar.update, dataset.label_to_cat_id)
        return coco_detections(outputs(), model.config.strides, model.config.reg_max, dataset.label_to_cat_id,
                               cfg).get("model", [])


def exported_detections(model: ExportedDetector, loader, advance, label_to_cat_id) -> list[dict]:
    """predict_dataset's COCO results from an exported detector, sorted by image id."""
    results = []
    for batch in loader:
        for record, det in zip(batch.records, model.detect(batch.images, batch.records)):
            results.extend(detections_to_coco(record.image_id, det.boxes, det.scores, det.labels, label_to_cat_id))
        advance(len(batch.records))
    return sorted(results, key=lambda d: d["image_id"])


def evaluate_model(model, dataset: CocoDetection, device, batch_size: int = 1, workers: int = 0, amp: str = "auto",
                   progress: bool = True) -> tuple[dict | None, list[dict] | None]:
    """-> (COCO metrics {"AP", "AP50", ...}, the detections as COCO results). Under torchrun
    every rank predicts its share of the images and rank 0 gathers them and scores them (the
    other ranks get (None, None)): a waiting rank waits for the slowest share, not for them all."""
    share = (distributed.rank(), distributed.world_size())
    results = predict_dataset(model, dataset, device, batch_size, workers, amp, progress=progress, share=share)
    results = distributed.gather_to_main(results)
    if results is None:
        return None, None
    results = sorted(results, key=lambda r: r["image_id"])
    return coco_evaluate(dataset.ann_file, results, image_ids=dataset.image_ids), results


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str = param(None, "our checkpoint, an mmdetection GFL checkpoint, or a file from ldcache export",
                            InputFile("checkpoint file"), shown="required")
    out: str = param("results.json", "COCO results json to write; the metrics go beside it as OUT.metrics.json",
                     OutputPath("file"))
    data: DataConfig = param(help="the images (the [data] table / data flags)", domain=Nested(DataConfig),
                             factory=DataConfig, flag=False)
    batch_size: int = param(8, "images per forward (equal canvases only, so results do not change)", Range(1, 4096))
    device: str = param("auto", "auto (cuda when available), cpu, cuda or cuda:N", Device())
    workers: int = param(2, "DataLoader worker processes", Range(0, 256))
    amp: str = param("auto", "auto (bf16 on CUDA), off, bf16 or fp16", OneOf(*AMP_MODES))
    arch: dict = param(help="architecture flags for checkpoints without a config", domain=Table(), factory=dict,
                       flag=False)

    def __post_init__(self):
        validate_fields(self, "evaluation configuration")
        problems = []
        if not self.checkpoint:
            problems.append("--checkpoint is required")
        check(problems, "evaluation configuration")


def check_categories(ids: list[int] | None, names: list[str] | None, dataset: CocoDetection, ann, source) -> None:
    """A label is an index into the dataset's sorted categories, so categories other than those the
    model learnt would score each class as another: refused when both the ids and the names differ
    from what training recorded (a checkpoint without that record, mmdetection's, is not checked)."""
    if ids is None or list(ids) == [int(c) for c in dataset.cat_ids]:
        return
    if names is not None and list(names) == list(dataset.class_names):
        return  # the same classes in the same order, numbered otherwise: labels map through ann's ids
    brief = lambda values: ", ".join(map(str, list(values)[:6])) + (", ..." if len(values) > 6 else "")  # noqa: E731
    raise UserError(f"{source} was trained on the categories {brief(names or ids)} (ids {brief(ids)}) but {ann} has "
                    f"{brief(dataset.class_names)} (ids {brief(dataset.cat_ids)}); evaluate on the dataset it was "
                    "trained for")


def run_evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """COCO AP of a checkpoint (or an exported file) on a dataset: writes cfg.out (results) and
    OUT.metrics.json. Under torchrun every rank predicts its share of the images; rank 0 scores
    and writes. -> {"metrics", "detections", "images", "out", "metrics_path"}."""
    meta = exported_meta(cfg.checkpoint)  # an exported file carries its architecture, transform and thresholds
    if meta is not None:
        if cfg.arch:
            raise UserError(f"{cfg.checkpoint} is an exported file, which records its architecture; drop the "
                            f"architecture flags ({', '.join('--' + k.replace('_', '-') for k in cfg.arch)})")
        strides, num_classes, model_dict = tuple(meta["strides"]), meta["num_classes"], meta["model"]
        trained = None if meta["transform"]["img_scale_from"] == "default" else tuple(meta["transform"]["img_scale"])
    else:
        ckpt = read_checkpoint(cfg.checkpoint)
        model_cfg = resolve_model_config(ckpt, **cfg.arch)
        strides, num_classes, model_dict = model_cfg.strides, model_cfg.num_classes, model_cfg.to_dict()
        trained = trained_img_scale(ckpt)
    data = cfg.data.resolve("val", scale=trained)  # no data: the synthetic val split
    images, ann, scale = data.images, data.ann, data.img_scale
    dataset = CocoDetection(images, ann, views=[ViewSpec(False, tuple(scale))], strides=strides, train=False)
    if dataset.num_classes != num_classes:
        raise UserError(f"the checkpoint predicts {num_classes} classes but {ann} has {dataset.num_classes}; "
                        "evaluate on the dataset it was trained for")
    if meta is not None:
        check_categories(meta.get("category_ids"), meta.get("class_names"), dataset, ann, cfg.checkpoint)
    else:
        check_categories(recorded_category_ids(ckpt, num_classes), recorded_class_names(ckpt, num_classes), dataset,
                         ann, cfg.checkpoint)
    dist_info = distributed.init_from_env(cfg.device)  # torchrun: every rank evaluates its share
    device = resolve_device(cfg.device, dist_info.local_rank if dist_info.enabled else None)
    if meta is not None:
        model = ExportedDetector(cfg.checkpoint, device)
    else:
        model = build_detector(model_cfg)
        load_state_dict_strict(model, ckpt["state_dict"], source=f"checkpoint {cfg.checkpoint}")
        model.to(device)
    metrics, results = evaluate_model(model, dataset, device, cfg.batch_size, cfg.workers, cfg.amp,
                                      progress and dist_info.is_main)
    if results is None:  # another rank's share went to rank 0, which writes the results
        return {"metrics": None}
    out = Path(cfg.out)
    save_results(out, results)
    metrics_path = out.with_suffix(".metrics.json")
    metrics_path.write_text(json.dumps({"metrics": metrics, "checkpoint": str(cfg.checkpoint), "ann": str(ann),
                                        "img_scale": list(scale), "model": model_dict,
                                        **({"exported": meta["format"]} if meta else {})}, indent=2) + "\n")
    return {"metrics": metrics, "detections": len(results), "images": len(dataset), "out": out,
            "metrics_path": metrics_path}
