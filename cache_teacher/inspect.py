"""inspect-cache: what a cache holds, whether it is whole and faithful, and a picture of one view."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cache_teacher import schema
from cache_teacher.codec import all_finite
from cache_teacher.fidelity import edge_kl
from cache_teacher.reader import TeacherCache
from detector.checkpoint import file_sha256, load_model
from detector.coco import CocoDetection
from detector.errors import UserError
from detector.postprocess import postprocess
from detector.rows import flatten_rows, row_index, row_location, view_maps
from detector.views import PIXEL_MEAN, PIXEL_STD


PICTURE_MIN_SCORE = 0.25
PICTURE_MAX_DETECTIONS = 12


def summarize(cache: TeacherCache) -> dict:
    meta = cache.meta
    done = cache.shards_done()
    used_rows = int(cache.num_rows.sum())
    stored = cache.bytes_on_disk()
    row_bytes = {  # bytes of one stored row in each array
        "box": meta.box_row_width * np.dtype(meta.box_dtype).itemsize,
        "box_lo": 8, "box_scale": 8, "location": 4,
        "cls": meta.num_classes * np.dtype(meta.cls_dtype).itemsize if meta.has_cls else 0,
    }
    logical = {name: used_rows * row_bytes[name] for name in stored}
    canvases = Counter(r.padded_hw for r in cache.records)
    total_stored = sum(stored.values())
    num_views = len(cache.records)
    return {
        "location": cache.location,
        "format_version": schema.FORMAT_VERSION,
        "created": meta.created,
        "package_version": meta.package_version,
        "complete": bool(meta.complete and done.all()),
        "shards_done": int(done.sum()),
        "num_shards": len(done),
        "images": meta.num_images,
        "views": num_views,
        "view_specs": [s.name for s in cache.specs],
        "teacher": {**meta.teacher_config, "checkpoint_sha256": meta.teacher_sha256},
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
    return (f"{r['kind']} (VLR gamma >= {r['min_vlr_gamma']}, {r['vlr_iou']} DIoU): {r['rows_stored']:,} of "
            f"{r['rows_dense']:,} rows stored ({r['rows_stored'] / max(r['rows_dense'], 1):.1%})")


def _mb(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def format_summary(s: dict) -> str:
    t = s["teacher"]
    rows = [
        ("cache", f"{s['location']} (format v{s['format_version']}, ldcache {s['package_version']}, {s['created']})"),
        ("state", f"{'complete' if s['complete'] else 'INCOMPLETE'}: {s['shards_done']}/{s['num_shards']} shards"),
        ("teacher", f"GFL R-{t['depth']} ({t['num_classes']} classes, width {t['base_width']}, fpn {t['fpn_channels']}, "
                    f"head {t['head_channels']}x{t['stacked_convs']}), sha256 {t['checkpoint_sha256'][:12]}"),
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
        ("on disk", f"{_mb(s['bytes_on_disk_total'])} (" + ", ".join(f"{k} {_mb(v)}" for k, v in s["bytes_on_disk"].items()) + ")"),
        ("per view", f"{s['bytes_per_view'] / 1024:,.1f} KiB"),
        ("compression", f"{s['compression_ratio']:.2f}x (stored rows / bytes on disk)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _dataset_for(cache: TeacherCache, images, ann) -> CocoDetection:
    images = images or cache.meta.source.get("images")
    ann = ann or cache.meta.source.get("ann")
    if not images or not ann:
        raise UserError("this needs the dataset: pass --images and --ann")
    return CocoDetection(images, ann, views=cache.specs, strides=cache.meta.strides, train=True)


def verify(cache: TeacherCache, teacher: str | None = None, images=None, ann=None, num_views: int = 8, seed: int = 0,
           device: str = "cpu", progress=None) -> dict:
    """Completeness, finite values, identity and (with a teacher) fidelity against a fresh fp32 forward."""
    problems: list[str] = []
    done = cache.shards_done()
    if not done.all() or not cache.complete:
        problems.append(f"incomplete: {int(done.sum())}/{len(done)} shards written")
    bad_rows = 0
    for shard in np.nonzero(done)[0]:  # whole shards: contiguous reads
        bad_rows += int((~all_finite(cache.read_shard(int(shard)))).sum())
        if progress:
            progress()
    if bad_rows:
        problems.append(f"{bad_rows} rows hold NaN or inf")
    if cache.meta.transform != schema.transform_spec():
        problems.append("the cache was made with another input transform than this ldcache builds")
    result = {"complete": bool(done.all() and cache.complete), "nonfinite_rows": bad_rows}
    dataset = None
    if ann or images or cache.meta.source.get("ann"):
        try:
            dataset = _dataset_for(cache, images, ann)
            mismatch = cache.meta.mismatches(ann_sha256=dataset.ann_sha256, image_ids=dataset.image_ids)
            problems += mismatch
            result["dataset_matches"] = not mismatch
        except UserError as err:
            if ann or images:
                raise
            result["dataset_matches"] = None  # the dump's dataset is no longer where it was
            problems.append(f"dataset not checked ({err})")
    if teacher is not None:
        sha = file_sha256(teacher)
        result["teacher_matches"] = sha == cache.meta.teacher_sha256
        if not result["teacher_matches"]:
            problems.append(f"teacher checkpoint sha256 {sha[:12]} differs from the cache's "
                            f"{cache.meta.teacher_sha256[:12]}")
        if dataset is None:
            dataset = _dataset_for(cache, images, ann)
        result["fidelity"] = fidelity(cache, teacher, dataset, num_views, seed, device)
    result["problems"] = problems
    result["ok"] = not problems
    return result


@torch.no_grad()
def fidelity(cache: TeacherCache, teacher: str, dataset: CocoDetection, num_views: int, seed: int, device: str) -> dict:
    """KL(T=10) of stored box distributions against the teacher's fresh fp32 forward on N random
    views, each alone on its own canvas (the cache's definition of a view's maps)."""
    dev = torch.device(device)
    model, config = load_model(teacher, {}, dev, role="teacher checkpoint")
    gen = np.random.default_rng(seed)
    chosen = gen.choice(len(cache.records), size=min(num_views, len(cache.records)), replace=False)
    kls, cls_err = [], 0.0
    for v in chosen:
        cached = cache.read_view(int(v))
        image_index, spec_index = int(cache.view_table["image_index"][v]), int(cache.view_table["spec_index"][v])
        sample = dataset[(image_index, spec_index)]
        cls_maps, box_maps = model(sample.image[None].to(dev))
        rows = cached.location.long() if cached.location is not None else slice(None)  # sparse: stored rows only
        fresh_box = flatten_rows(box_maps, [cached.record.level_hw]).float().cpu()[rows]
        if len(fresh_box) == 0:
            continue
        kls.append(edge_kl(fresh_box, cached.box, 10.0, config.reg_max + 1))
        if cached.cls is not None:
            fresh_cls = flatten_rows(cls_maps, [cached.record.level_hw]).float().cpu()[rows]
            cls_err = max(cls_err, float((fresh_cls - cached.cls).abs().max()))
    kl = torch.cat(kls)
    return {"views": len(chosen), "kl_t10_mean": float(kl.mean()), "kl_t10_p99": float(kl.quantile(0.99)),
            "kl_t10_max": float(kl.max()), "cls_max_abs_err": cls_err if cache.has_cls else None}


def format_verify(r: dict) -> str:
    lines = [f"verify: {'OK' if r['ok'] else 'PROBLEMS'}",
             f"  complete          {r['complete']}",
             f"  non-finite rows   {r['nonfinite_rows']}"]
    if "dataset_matches" in r:
        lines.append(f"  dataset matches   {r['dataset_matches']}")
    if "teacher_matches" in r:
        lines.append(f"  teacher matches   {r['teacher_matches']}")
    if "fidelity" in r:
        f = r["fidelity"]
        lines.append(f"  KL(T=10) on {f['views']} fresh fp32 views: mean {f['kl_t10_mean']:.3g}, p99 {f['kl_t10_p99']:.3g}, "
                     f"max {f['kl_t10_max']:.3g}")
        if f["cls_max_abs_err"] is not None:
            lines.append(f"  class logits max |error| {f['cls_max_abs_err']:.3g}")
    lines += [f"  problem: {p}" for p in r["problems"]]
    return "\n".join(lines)


def render_png(cache: TeacherCache, view: int, out: Path, images=None, ann=None, temperature: float = 1.0) -> Path:
    """The view with its GT boxes, the teacher's top detections decoded from the cache, and the four
    edge distributions of the top detection's location."""
    from cache_teacher.picture import render_view

    if not 0 <= view < len(cache.records):
        raise UserError(f"--view {view} is out of range: the cache holds views 0..{len(cache.records) - 1}")
    dataset = _dataset_for(cache, images, ann)
    record = cache.records[view]
    sample = dataset[(int(cache.view_table["image_index"][view]), int(cache.view_table["spec_index"][view]))]
    h, w = record.resized_hw
    mean, std = torch.tensor(PIXEL_MEAN)[:, None, None], torch.tensor(PIXEL_STD)[:, None, None]
    image = (sample.image[:, :h, :w] * std + mean).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    cached = cache.read_view(view).dense()  # a sparse cache shows only what it stores
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
        row = int(cached.cls.sigmoid().amax(dim=1).argmax())
    else:  # no class logits: show the location closest to the centre of the largest GT box
        row = _row_near_largest_gt(record, sample.boxes, strides)
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


def _row_near_largest_gt(record, gt_boxes: torch.Tensor, strides) -> int:
    if len(gt_boxes) == 0:
        return 0
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    box = gt_boxes[int(areas.argmax())]
    cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    side = float(max(box[2] - box[0], box[3] - box[1]))
    for level, ((h, w), s) in enumerate(zip(record.level_hw, strides)):
        if side <= 8 * s * 2 or s == strides[-1]:  # the first level whose anchors (8 x stride) fit the box
            return row_index(record.level_hw, level, min(h - 1, round(cy / s)), min(w - 1, round(cx / s)))
    return 0

