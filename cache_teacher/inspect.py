"""inspect-cache: what a cache holds, whether it is whole and faithful, and a picture of one view."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache_teacher.reader import CacheReader
from cache_teacher.verify import dataset_of_cache, format_verify, sample_of_view, verify, written_views
from core.config import param, validate_fields
from core.domains import Flag, JsonObject, Nested, Range
from core.errors import UserError
from core.paths import InputFile, OutputPath
from core.runtime import Device, resolve_device
from data.config import DataConfig
from data.views import PIXEL_MEAN, PIXEL_STD
from detector.config import ModelConfig
from detector.postprocess import postprocess
from detector.rows import row_location, view_maps

PICTURE_MIN_SCORE = 0.25
PICTURE_MAX_DETECTIONS = 12


def summarize(cache: CacheReader) -> dict:
    meta = cache.meta
    done = cache.shards_done()
    used_rows = int(cache.num_rows.sum())
    stored = cache.bytes_on_disk()
    logical = cache.row_bytes()
    canvases = Counter(r.padded_hw for r in cache.records)
    total_stored = sum(stored.values())
    num_views = len(cache.records)
    return {
        "location": cache.location,
        "format_version": meta.format_version,
        "created": meta.created,
        "package_version": meta.package_version,
        "complete": bool(meta.complete and done.all()),
        "shards_done": int(done.sum()),
        "num_shards": len(done),
        "images": meta.num_images,
        "views": num_views,
        "view_specs": [s.name for s in cache.specs],
        "teacher": {**meta.teacher_config, "checkpoint_sha256": meta.teacher_sha256},
        "precision": meta.precision,
        "strides": list(meta.strides),
        "reg_max": meta.reg_max,
        "num_classes": meta.num_classes,
        "regions": meta.regions.to_json(),
        "box_dtype": meta.box_dtype,
        "cls_dtype": meta.cls_dtype,
        "compressor": meta.layout.compressor,
        "rows": used_rows,
        "canvases": [{"padded_hw": list(hw), "views": n,
                      "level_hw": [list(x) for x in next(r.level_hw for r in cache.records if r.padded_hw == hw)]}
                     for hw, n in sorted(canvases.items())],
        "bytes_on_disk": stored,
        "bytes_on_disk_total": total_stored,
        "bytes_per_view": total_stored / max(num_views, 1),
        "compression_ratio": sum(logical.values()) / max(total_stored, 1),
    }


def _regions_line(r: dict) -> str:
    if r["kind"] == "dense":
        return "dense: every prior location of every view"
    line = (f"{r['kind']} (VLR gamma >= {r['min_vlr_gamma']}, {r['vlr_iou']} DIoU): box logits at {r['rows_stored']:,} "
            f"of {r['rows_dense']:,} rows ({r['rows_stored'] / max(r['rows_dense'], 1):.1%})")
    if r.get("cls_topk"):
        line += f"; every row: expected edges and the top {r['cls_topk']} class logits + a floor"
    return line


def _mb(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def format_summary(s: dict) -> str:
    t = s["teacher"]
    teacher = ModelConfig.from_dict({k: v for k, v in t.items() if k != "checkpoint_sha256"})  # no backbone: ResNet
    rows = [
        ("cache", f"{s['location']} (format v{s['format_version']}, ldcache {s['package_version']}, {s['created']})"),
        ("state", f"{'complete' if s['complete'] else 'INCOMPLETE'}: {s['shards_done']}/{s['num_shards']} shards"),
        (
            "teacher",
            f"GFL {teacher.backbone_name} ({teacher.num_classes} classes, fpn {teacher.fpn_channels}, "
            f"head {teacher.head_channels}x{teacher.stacked_convs}), sha256 {t['checkpoint_sha256'][:12]}, "
            f"computed in {s['precision'] or 'a precision not recorded'}",
        ),
        ("images / views", f"{s['images']:,} / {s['views']:,} ({', '.join(s['view_specs'])})"),
        ("levels", f"strides {s['strides']}, reg_max {s['reg_max']}, {s['rows']:,} rows"),
    ]
    for c in s["canvases"][:6]:
        rows.append(("  canvas " + "x".join(map(str, c["padded_hw"])),
                     f"{c['views']:,} views, levels " + " ".join("x".join(map(str, hw)) for hw in c["level_hw"])))
    if len(s["canvases"]) > 6:
        rows.append(("  ...", f"{len(s['canvases']) - 6} more canvas sizes"))
    rows += [
        ("dtypes", f"box {s['box_dtype']}, cls {s['cls_dtype'] or 'not stored'}, compressor {s['compressor']}"),
        ("regions", _regions_line(s["regions"])),
        (
            "on disk",
            f"{_mb(s['bytes_on_disk_total'])} ("
            + ", ".join(f"{k} {_mb(v)}" for k, v in s["bytes_on_disk"].items())
            + ")",
        ),
        ("per view", f"{s['bytes_per_view'] / 1024:,.1f} KiB"),
        ("compression", f"{s['compression_ratio']:.2f}x (stored rows / bytes on disk)" if s["compressor"] != "none"
         else f"none ({min(s['compression_ratio'], 1):.0%} of the bytes on disk are rows; the rest is chunk padding "
              "and the shard index, a large share only in tiny caches)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def render_png(cache: CacheReader, view: int, out: Path, images=None, ann=None, temperature: float = 1.0) -> Path:
    """The view with its GT boxes, the teacher's top detections decoded from the cache, and the four
    edge distributions of the top-scoring location among those whose box logits are stored."""
    from cache_teacher.picture import render_view

    if not 0 <= view < len(cache.records):
        raise UserError(f"--view {view} is out of range: the cache holds views 0..{len(cache.records) - 1}")
    if not written_views(cache)[view]:
        raise UserError(f"--view {view} is not written yet (the cache is incomplete); re-run the same dump-teacher "
                        "command to finish it, or pick a view of a written shard")
    dataset = dataset_of_cache(cache, images, ann)
    record = cache.records[view]
    sample = sample_of_view(cache, dataset, view)
    h, w = record.resized_hw
    mean, std = torch.tensor(PIXEL_MEAN)[:, None, None], torch.tensor(PIXEL_STD)[:, None, None]
    image = (sample.image[:, :h, :w] * std + mean).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    stored = cache.read_view(view)
    cached = stored.without_holes()  # a sparse cache shows only what it stores
    box_maps = [m[None] for m in view_maps(cached.box, record.level_hw)]
    strides, reg_max = cache.meta.strides, cache.meta.reg_max
    frame = dataclasses.replace(record, orig_hw=record.resized_hw, flip=False)  # decode in the view's own pixels
    empty = np.zeros((0, 4))
    det_boxes, det_scores, det_labels = empty, np.zeros(0), np.zeros(0, dtype=int)
    if cached.cls is not None:
        cls_maps = [m[None] for m in view_maps(cached.cls, record.level_hw)]
        det = postprocess(cls_maps, box_maps, [frame], strides, reg_max)[0]
        keep = (det.scores >= PICTURE_MIN_SCORE).nonzero().squeeze(1)[:PICTURE_MAX_DETECTIONS]  # a readable picture
        det_boxes, det_scores, det_labels = det.boxes[keep].numpy(), det.scores[keep].numpy(), det.labels[keep].numpy()
        score = cached.cls.sigmoid().amax(dim=1)
    else:  # no class logits: show the location closest to the centre of the largest GT box
        score = _closeness_to_largest_gt(record, sample.boxes, strides)
    if stored.location is not None:  # only stored rows hold the teacher's distributions (ld+bckd: edges elsewhere)
        rows_stored = stored.location.long()
        score = torch.full_like(score, -float("inf")).index_copy(0, rows_stored, score[rows_stored])
    row = int(score.argmax())
    edge_logits = cached.box[row].reshape(4, reg_max + 1).numpy()
    edge_box = _decode_row(record, row, cached.box[row], strides, reg_max)
    names = dataset.class_names
    title = (f"view {view}: image {record.image_id}, {'hflip' if record.flip else 'orig'} at "
             f"{record.img_scale[0]}x{record.img_scale[1]} ({w}x{h} px)")
    return render_view(out, image, sample.boxes.numpy(), sample.labels.numpy(), det_boxes, det_scores, det_labels,
                       edge_logits, edge_box, names, title=title, temperature=temperature)


def _decode_row(record, row: int, box_logits: torch.Tensor, strides, reg_max: int) -> np.ndarray:
    level, y, x = row_location(record.level_hw, row)
    s = strides[level]
    dist = (box_logits.reshape(4, reg_max + 1).softmax(-1) @ torch.arange(reg_max + 1, dtype=torch.float32)) * s
    cx, cy = x * s, y * s
    return np.array([cx - float(dist[0]), cy - float(dist[1]), cx + float(dist[2]), cy + float(dist[3])])


def _closeness_to_largest_gt(record, gt_boxes: torch.Tensor, strides) -> torch.Tensor:
    """[num_rows] the higher, the closer a location is to the centre of the largest GT box, on the
    first level whose anchors (8 x stride) fit the box (other levels after it)."""
    scores = []
    if len(gt_boxes) == 0:
        return -torch.arange(record.num_rows, dtype=torch.float32)  # the first row
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    box = gt_boxes[int(areas.argmax())]
    cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    side = float(max(box[2] - box[0], box[3] - box[1]))
    fits = next((level for level, s in enumerate(strides) if side <= 8 * s * 2), len(strides) - 1)
    for level, ((h, w), s) in enumerate(zip(record.level_hw, strides)):
        y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                              indexing="ij")
        distance = ((x * s - cx) ** 2 + (y * s - cy) ** 2).sqrt().reshape(-1) / s  # in this level's strides
        scores.append(-distance - 1e6 * (level != fits))
    return torch.cat(scores)


@dataclass(frozen=True)
class InspectConfig:
    json: bool = param(False, "print the summary (and verification) as JSON", Flag())
    verify: bool = param(False, "check completeness, finite values, identity (and fidelity with --teacher)", Flag())
    teacher: str | None = param(None, "with --verify: the teacher to re-run on --num-views random views",
                                InputFile("checkpoint file"), shown="none")
    num_views: int = param(8, "views re-run by --verify --teacher", Range(1, 10**7))
    ap_images: int = param(1000, "--verify: the teacher's COCO AP from the cache on up to this many cached images "
                                 "(0: skip)", Range(0, 10**8))
    png: str | None = param(None, "write a picture of --view: GT, decoded detections, edge distributions",
                            OutputPath("file"), shown="none")
    view: int = param(0, "view index for --png", Range(0, 10**12))
    data: DataConfig = param(help="the images (the [data] table / data flags)", domain=Nested(DataConfig),
                             factory=DataConfig, flag=False)
    device: str = param("auto", "auto (cuda when available), cpu, cuda or cuda:N", Device())
    storage_options: dict | None = param(None, "JSON of fsspec storage options for a URL", JsonObject(), shown="none")

    def __post_init__(self):
        validate_fields(self, "inspect configuration")


def run_inspect(store: str, cfg: InspectConfig) -> tuple[dict, str]:
    """-> (the report: summary, verify, png; the text to print)."""
    cache = CacheReader(store, cfg.storage_options)
    report = {"summary": summarize(cache)}
    if cfg.verify:
        report["verify"] = verify(cache, cfg.teacher, cfg.data.images, cfg.data.ann, cfg.num_views,
                                  device=str(resolve_device(cfg.device)), ap_images=cfg.ap_images)
    if cfg.png is not None:
        report["png"] = str(render_png(cache, cfg.view, Path(cfg.png), cfg.data.images, cfg.data.ann))
    if cfg.json:
        return report, json.dumps(report, indent=2)
    text = [format_summary(report["summary"])]
    if cfg.verify:
        text.append(format_verify(report["verify"]))
    if cfg.png is not None:
        text.append(f"picture of view {cfg.view} -> {report['png']}")
    return report, "\n".join(text)
