"""inspect-cache --verify: is a cache whole (every shard written, every row finite), is it the
cache of this dataset and teacher, how good is the teacher it holds (COCO AP of the cached original
views, decoded as `evaluate` decodes, with no teacher forward), and how faithful are its stored
distributions (KL at T=10 against a fresh fp32 forward of the teacher)."""

from __future__ import annotations

import numpy as np
import torch

from cache_teacher import schema
from cache_teacher.codec import all_finite
from cache_teacher.fidelity import edge_kl
from cache_teacher.reader import CacheReader
from core.errors import UserError
from data.coco import CocoDetection
from data.config import DataConfig
from detector.checkpoint import file_sha256, load_model, read_checkpoint, stored_model_config
from detector.config import ARCH_FIELDS
from detector.distributions import integral
from detector.evaluation import coco_evaluate
from detector.inference import coco_detections
from detector.rows import flatten_rows, view_maps


def dataset_of_cache(cache: CacheReader, images=None, ann=None) -> CocoDetection:
    """The cached dataset: the images given, else where the dump found them (never the synthetic
    default in their place)."""
    source = cache.meta.source
    hint = (source["images"], source["ann"]) if source.get("images") and source.get("ann") else None
    data = DataConfig(images=images, ann=ann).resolve(dataset=hint, fallback=False)
    return CocoDetection(data.images, data.ann, views=cache.specs, strides=cache.meta.strides, train=True)


def written_views(cache: CacheReader) -> np.ndarray:
    """[V] bool: is the view's shard written (its rows hold the teacher's logits, not fill)?"""
    if cache.complete:
        return np.ones(len(cache.records), dtype=bool)
    return cache.shards_done()[cache.row_offset // cache.meta.layout.rows_per_shard]


def sample_of_view(cache: CacheReader, dataset: CocoDetection, v: int, positions: dict | None = None,
                   annotations: bool = True):
    """The dataset's sample of cached view v (its image found by id; positions: image id -> dataset
    index, for many calls), or a UserError when the dataset given is not the one the cache was
    dumped from: the image is missing, has another size, or (annotations) other boxes or file name."""
    record = cache.records[v]
    if positions is None:
        positions = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    index = positions.get(record.image_id)
    image = None if index is None else cache.index_of_image.get(record.image_id)
    same = index is not None and dataset.view_record(index, int(cache.view_table["spec_index"][v])) == record and (
        not annotations or cache.image_digests is None
        or bytes(cache.image_digests[image]) == dataset.image_digest(index))
    if not same:
        raise UserError(f"image {record.image_id} of cached view {v} {'is not in' if index is None else 'differs in'} "
                        f"{dataset.ann_file}; pass the --images and --ann the cache was dumped from")
    return dataset[(index, int(cache.view_table["spec_index"][v]))]


def verify(cache: CacheReader, teacher: str | None = None, images=None, ann=None, num_views: int = 8, seed: int = 0,
           device: str = "cpu", progress=None, ap_images: int = 1000) -> dict:
    """Completeness, finite values, identity, the teacher's AP from the cache (on up to ap_images
    images, 0: skip) and (with a teacher) fidelity against a fresh fp32 forward."""
    problems: list[str] = []
    done = cache.shards_done()
    if not done.all() or not cache.complete:
        problems.append(f"incomplete: {int(done.sum())}/{len(done)} shards written")
    bad_rows = 0
    for shard in np.nonzero(done)[0]:  # whole shards: contiguous reads
        bad_rows += sum(int((~all_finite({name: a})).sum()) for name, a in cache.read_shard(int(shard)).items())
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
            dataset = dataset_of_cache(cache, images, ann)
            mismatch = cache.meta.mismatches(ann_sha256=dataset.ann_sha256, image_ids=dataset.image_ids)
            problems += mismatch
            result["dataset_matches"] = not mismatch
        except UserError as err:
            if ann or images:
                raise
            result["dataset_matches"] = None  # the dump's dataset is no longer where it was
            problems.append(f"dataset not checked ({err})")
    if dataset is not None and result.get("dataset_matches") and ap_images > 0 and cache.has_cls and result["complete"]:
        result["teacher_ap"] = teacher_ap(cache, dataset, ap_images, seed)
    if teacher is not None:
        sha = file_sha256(teacher)
        result["teacher_matches"] = sha == cache.meta.teacher_sha256
        if not result["teacher_matches"]:
            problems.append(f"teacher checkpoint sha256 {sha[:12]} differs from the cache's "
                            f"{cache.meta.teacher_sha256[:12]}")
        if dataset is None:
            dataset = dataset_of_cache(cache, images, ann)
        result["fidelity"] = fidelity(cache, teacher, dataset, num_views, seed, device)
    result["problems"] = problems
    result["ok"] = not problems
    return result


@torch.no_grad()
def fidelity(cache: CacheReader, teacher: str, dataset: CocoDetection, num_views: int, seed: int, device: str) -> dict:
    """KL(T=10) of stored box distributions against the teacher's fresh fp32 forward on N random
    views, each alone on its own canvas (the cache's definition of a view's maps)."""
    dev = torch.device(device)
    # A checkpoint without a recorded architecture (mmdetection's) is rebuilt as the dump built it,
    # from the architecture the cache recorded (with what the weights cannot show: GroupNorm groups).
    ckpt = read_checkpoint(teacher)
    recorded = cache.meta.teacher_config
    arch = {k: recorded[k] for k in ARCH_FIELDS if k in recorded} if stored_model_config(ckpt) is None else {}
    model, config = load_model(teacher, arch, dev, role="teacher checkpoint", ckpt=ckpt)
    differ = [f"{name} {mine} (the cache: {theirs})" for name, mine, theirs in (
        ("classes", config.num_classes, cache.meta.num_classes), ("reg_max", config.reg_max, cache.meta.reg_max),
        ("strides", list(config.strides), list(cache.meta.strides))) if mine != theirs]
    if differ:
        raise UserError(f"--teacher {teacher} has {', '.join(differ)}: it cannot have made this cache; pass the "
                        "teacher the cache was dumped with")
    gen = np.random.default_rng(seed)
    positions = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    written = np.nonzero(written_views(cache))[0]  # an incomplete cache: the views of its written shards
    chosen = written[gen.choice(len(written), size=min(num_views, len(written)), replace=False)]
    kls, cls_err, prob_err, edge_err = [], 0.0, 0.0, 0.0
    two = cache.meta.regions.two_spaces  # ld+bckd: class logits (top-k + floor) and edges at every location
    for v in chosen:
        cached = cache.read_view(int(v))
        sample = sample_of_view(cache, dataset, int(v), positions, annotations=False)  # the pixels only
        cls_maps, box_maps = model(sample.image[None].to(dev))
        rows = cached.location.long() if cached.location is not None else slice(None)  # sparse: stored rows only
        all_box = flatten_rows(box_maps, [cached.record.level_hw]).float().cpu()
        if two:
            edge_err = max(edge_err, float((integral(all_box, config.reg_max) - cached.edges).abs().max()))
        fresh_box = all_box[rows]
        if len(fresh_box):
            kls.append(edge_kl(fresh_box, cached.box, 10.0, config.reg_max + 1))
        if cached.cls is not None:
            fresh_cls = flatten_rows(cls_maps, [cached.record.level_hw]).float().cpu()[slice(None) if two else rows]
            prob_err = max(
                prob_err, float((fresh_cls.sigmoid() - cached.cls.sigmoid()).abs().amax() if fresh_cls.numel() else 0.0)
            )
            if not two:  # top-k + floor is exact only in probability mass: its logit error says little
                cls_err = max(cls_err, float((fresh_cls - cached.cls).abs().amax()) if fresh_cls.numel() else 0.0)
    kl = torch.cat(kls) if kls else torch.zeros(1)
    return {"views": len(chosen), "kl_t10_mean": float(kl.mean()), "kl_t10_p99": float(kl.quantile(0.99)),
            "kl_t10_max": float(kl.max()), "cls_max_abs_err": cls_err if cache.has_cls and not two else None,
            "cls_max_prob_err": prob_err if cache.has_cls else None, "edges_max_abs_err": edge_err if two else None}


@torch.no_grad()
def teacher_ap(cache: CacheReader, dataset: CocoDetection, max_images: int = 1000, seed: int = 0) -> dict:
    """COCO AP of the cached teacher on (a seeded sample of) the cached images: each image's
    original view decoded from its stored rows through the post-processing `evaluate` uses, scored
    against the dataset's annotations. No teacher runs, so a wrong teacher (another dataset's
    class order, an untrained one) shows here, before any student is trained."""
    spec = next((s for s, v in enumerate(cache.specs) if not v.flip), 0)
    chosen = range(len(dataset))
    if len(dataset) > max_images:
        chosen = sorted(np.random.default_rng(seed).choice(len(dataset), size=max_images, replace=False).tolist())
    def outputs():  # each cached view's rows as the head's maps: no teacher runs
        for i in chosen:
            v = cache.view_index(int(i), spec)
            view = cache.read_view(v).without_holes()  # a region-sparse cache: its stored rows only
            record = cache.records[v]
            yield [record], {"cache": ([m[None] for m in view_maps(view.cls, record.level_hw)],
                                       [m[None] for m in view_maps(view.box, record.level_hw)])}

    results = coco_detections(outputs(), cache.meta.strides, cache.meta.reg_max, dataset.label_to_cat_id).get(
        "cache", []
    )
    image_ids = [dataset.image_ids[int(i)] for i in chosen]
    metrics = coco_evaluate(dataset.ann_file, results, image_ids=image_ids)
    return {"images": len(image_ids), "of_images": len(dataset), "view": cache.specs[spec].name,
            "sparse": cache.sparse, "metrics": metrics}


def format_verify(r: dict) -> str:
    lines = [f"verify: {'OK' if r['ok'] else 'PROBLEMS'}",
             f"  complete          {r['complete']}",
             f"  non-finite rows   {r['nonfinite_rows']}"]
    if "dataset_matches" in r:
        lines.append(f"  dataset matches   {r['dataset_matches']}")
    if "teacher_matches" in r:
        lines.append(f"  teacher matches   {r['teacher_matches']}")
    if "teacher_ap" in r:
        ap = r["teacher_ap"]
        m = ap["metrics"]
        note = ", stored rows only (region-sparse)" if ap["sparse"] else ""
        lines.append(
            f"  teacher AP from the cache ({ap['view']} views of {ap['images']:,} of {ap['of_images']:,} cached "
            f"images{note}): AP {100 * m['AP']:.1f}, AP50 {100 * m['AP50']:.1f}, AP75 {100 * m['AP75']:.1f}"
        )
        if m["AP50"] < 0.01:
            lines.append("  note: the teacher finds almost nothing on its own training images: an untrained "
                         "teacher, or one of another dataset (class order)?")
    if "fidelity" in r:
        f = r["fidelity"]
        lines.append(
            f"  KL(T=10) on {f['views']} fresh fp32 views: mean {f['kl_t10_mean']:.3g}, p99 {f['kl_t10_p99']:.3g}, "
            f"max {f['kl_t10_max']:.3g}"
        )
        if f["cls_max_abs_err"] is not None:
            lines.append(f"  class logits max |error| {f['cls_max_abs_err']:.3g}")
        if f.get("cls_max_prob_err") is not None:
            lines.append(f"  class probabilities max |error| {f['cls_max_prob_err']:.3g}")
        if f.get("edges_max_abs_err") is not None:
            lines.append(f"  expected edges max |error| {f['edges_max_abs_err']:.3g} (bins)")
    lines += [f"  problem: {p}" for p in r["problems"]]
    return "\n".join(lines)
