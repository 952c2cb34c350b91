"""The cache at COCO's geometry: a full-width R-101 teacher (80 classes, random weights) over
COCO-like images at img-scale 1333,800, both views; dump speed against the bare teacher forward,
bytes per view and fidelity of every storage mode, read speed, and train2017 extrapolated.

    .venv/bin/python -m benchmarks.suite.coco_geometry                      # 32 images = 64 views; CPU: ~30 min
    .venv/bin/python -m benchmarks.suite.coco_geometry --device cuda --num-images 256 --workers 8

Data: --num-images images of COCO train2017's published statistics (benchmarks/suite/sparse_size.py:
640x480 (landscape 3 in 4), 7.3 objects per image, its size mix, 80 classes), drawn as noise
images (pixels do not change a random teacher's cost). Modes, all measured on the same fresh fp32
teacher rows of every view (KL at T=10 of the stored box distributions, per edge, on the rows each
mode stores): dense fp16 (the reference), dense uint8, region-sparse main+vlr at min VLR gamma
0.25 and 0, sparse + uint8, and ld+bckd (what serves LD and BCKD: box logits at the main+vlr rows,
every location's expected edges and top-k class logits + floor) for k = 1, 2, 4, 8 and fp16 or
uint8 boxes (the fidelity of its class logits needs a trained teacher: benchmarks/studies/compact_fidelity.py);
bytes per view are the stored rows' bytes (uncompressed: what is on disk but the shard index).
Dumps: dense fp16, sparse(0.25) + uint8 and ld+bckd fp16 at the default k (4), timed against the bare
forward pass, their bytes on disk measured; reads of each with 1, 2 and 4 DataLoader workers
(benchmarks/suite/read_throughput.py). train2017: 118,287 images x 2 views
x the measured bytes per view (an estimate: COCO's own images differ from these).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import common
from benchmarks.harness.coco_like import write_coco_like
from cache_teacher.codec import decode_rows, encode_rows
from cache_teacher.dump import DumpConfig, run_dump
from cache_teacher.fidelity import edge_kl
from cache_teacher.reader import CacheReader
from data.coco import CocoDetection, collate
from data.config import DataConfig
from data.views import parse_views
from detector.checkpoint import load_model, save_checkpoint
from detector.regions import distillation_rows
from detector.rows import flatten_rows

SCRIPT = "coco_geometry"
TRAIN2017_IMAGES = 118_287
DEFAULT_TOPK = DumpConfig.__dataclass_fields__["cls_topk"].default
# (sparse min VLR gamma or None for dense, box dtype, ld+bckd's top-k or None)
MODES = {"dense fp16": (None, "float16", None), "dense uint8": (None, "uint8", None),
         "sparse 0.25 fp16": (0.25, "float16", None), "sparse 0 fp16": (0.0, "float16", None),
         "sparse 0.25 uint8": (0.25, "uint8", None), "sparse 0 uint8": (0.0, "uint8", None),
         # ld+bckd (serves LD and BCKD): box logits at the main+vlr rows, every row edges + top-k classes
         **{f"ld+bckd k={k} {name}": (0.25, dtype, k) for k in (1, 2, 4, 8)
            for name, dtype in (("fp16", "float16"), ("uint8", "uint8"))}}
# An 8-GPU node's appetite, from the cache spec's H200 measurements (batch 8, 1344x800, bf16):
# mmdetection's GFL R-18 step 102.8 ms, and 49.1 ms for the spec's proxy R-18 step (the bare network
# work: forward + backward, channels-last, a trivial loss, no assignment).
# Neither is a measurement of ours (no GPU was lent to this project).
NODE_RATES = {"8 x H200, mmdetection GFL R-18 step (102.8 ms / 8 images)": 8 * 8 / 0.1028,
              "8 x H200, the spec's bare R-18 network step (49.1 ms / 8 images)": 8 * 8 / 0.0491}


def make_data(work: Path, num_images: int) -> tuple[str, str]:
    ann = write_coco_like(num_images, work / "annotations.json", seed=0)
    images = work / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for im in json.loads(ann.read_text())["images"]:
        pixels = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / im["file_name"], quality=90)
    return str(images), str(ann)


@torch.no_grad()
def measure(teacher, dataset, device, batch_size: int, workers: int) -> tuple[dict, float]:
    """One fp32 pass over every view: per mode, bytes and KL of what it would store; and the
    seconds of the bare teacher forward (the dump's batches: equal canvases)."""
    keys, _ = common.dump_batches(dataset, teacher.config, "float16", "float16", 64.0, batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=workers, collate_fn=collate)
    sizes = {m: [] for m in MODES}
    kls = {m: [] for m in MODES}
    forward = 0.0
    bins = teacher.config.reg_max + 1
    for views, batch in zip(keys, loader):
        common.sync(device)
        start = time.perf_counter()
        cls_maps, box_maps = teacher(batch.images.to(device))
        common.sync(device)
        forward += time.perf_counter() - start
        level_hw = [r.level_hw for r in batch.records]
        n = batch.records[0].num_rows  # equal canvases
        box = flatten_rows(box_maps, level_hw).float().cpu().reshape(len(views), n, -1)
        for i, (image_index, spec_index) in enumerate(views):
            record = dataset.view_record(image_index, spec_index)
            gt, _ = dataset.view_boxes(image_index, record)
            for mode, (gamma, box_dtype, topk) in MODES.items():
                rows = slice(None) if gamma is None else distillation_rows(record.level_hw, gt, dataset.strides, gamma)
                fresh = box[i][rows]
                enc = encode_rows(fresh, box_dtype, teacher.config.reg_max)
                stored = decode_rows(enc["data"], enc.get("lo"), enc.get("scale"))
                row_bytes = sum(t.element_size() * t.shape[1] for t in enc.values()) + 4 * (
                    gamma is not None
                )  # location
                if topk is None:
                    sizes[mode].append(fresh.shape[0] * (row_bytes + 2 * teacher.config.num_classes))  # + fp16 cls
                else:  # every row: 4 fp16 edges, k fp16 logits + k uint8 classes, one fp16 floor
                    sizes[mode].append(fresh.shape[0] * row_bytes + n * (8 + 3 * topk + 2))
                kls[mode].append(edge_kl(fresh, stored, 10.0, bins).float())
    out = {}
    for mode in MODES:
        kl = torch.cat(kls[mode])
        out[mode] = {"bytes_per_view": float(np.mean(sizes[mode])), "kl_mean": float(kl.mean()),
                     "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max())}
    return out, forward


@torch.no_grad()
def calibrate_box_logits(path: str, dataset, device, target_std: float) -> float:
    """Scale a random teacher's box-logit conv so that a view's box logits spread over the 17 bins
    as a trained teacher's do (per-row std over the bins: 3.9-4.2 for this project's trained teachers),
    and save it back. A random head's logits are nearly flat, which would make every storage mode
    look lossless. Returns the factor applied."""
    teacher, config = load_model(path, {}, device)
    _, box_maps = teacher(collate([dataset[(0, 0)]]).images.to(device))
    rows = flatten_rows(box_maps, [dataset.view_record(0, 0).level_hw]).float().reshape(-1, config.reg_max + 1)
    factor = target_std / float(rows.std(dim=1).mean())
    teacher.bbox_head.gfl_reg.weight.mul_(factor)
    teacher.bbox_head.gfl_reg.bias.mul_(factor)
    save_checkpoint(path, teacher, config)
    return factor


def read_table(reads: dict) -> str:
    """Read rates (views/s) of each dumped cache: one process, then one DataLoader of N workers
    reading everything a student's step takes (box + cls, and edges in an ld+bckd cache)."""
    rows, columns = [], [("cache", "reads (views/s)", ""), ("single", "one process", ",.0f")]
    for cache, variants in reads.items():
        row = {"cache": cache, "single": variants.get("single process, box+cls")}
        for variant, rate in variants.items():
            if variant.startswith("DataLoader "):
                workers = variant.split()[1]
                row[workers] = rate
                if (workers, f"DataLoader, {workers} workers", ",.0f") not in columns:
                    columns.append((workers, f"DataLoader, {workers} workers", ",.0f"))
        rows.append(row)
    return common.markdown_table(rows, columns)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-images", type=int, default=32, help="COCO-like images (2 views each)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--img-scale", type=common.parse_pair, default=(1333, 800), help="LONG,SHORT (smaller: smoke runs)")
    p.add_argument("--teacher-width", type=int, default=64, help="ResNet stem width (64 = full; FPN and head 4x)")
    p.add_argument("--box-logit-std", type=float, default=4.0,
                   help="spread the random teacher's box logits to this std over the bins, as trained teachers "
                        "(0: leave the random head's near-flat logits)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the passes and dumps")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--read-workers", default="1,2,4", help="DataLoader workers of the read measurements")
    p.add_argument("--read-seconds", type=float, default=3.0)
    p.add_argument("--workdir")
    p.add_argument("--out", default=str(common.RESULTS_DIR / f"{SCRIPT}.json"))
    args = p.parse_args()
    device = common.resolve_device(args.device)
    common.apply_threads(args)
    with common.work_folder(args.workdir) as work:
        images, ann = make_data(work, args.num_images)
        width = args.teacher_width
        teacher_args = argparse.Namespace(teacher=None, depth=101, base_width=width, fpn_channels=4 * width,
                                          head_channels=4 * width, stacked_convs=4, seed=0)
        path, config, _ = common.prepare_teacher(teacher_args, 80, work)
        dataset = CocoDetection(images, ann, views=parse_views("orig,hflip", args.img_scale), strides=config.strides)
        factor = calibrate_box_logits(path, dataset, device, args.box_logit_std) if args.box_logit_std > 0 else 1.0
        teacher, _ = load_model(path, {}, device)
        num_views = 2 * len(dataset)
        print(f"{len(dataset)} COCO-like images, {num_views} views, R-101 width {width}, {device}", file=sys.stderr)
        modes, forward = measure(teacher, dataset, device, args.batch_size, args.workers)
        dumps, reads = {}, {}
        for name, kw in {"dense fp16": {}, "sparse 0.25 uint8": {"store_regions": "main+vlr", "min_vlr_gamma": 0.25,
                                                                   "box_dtype": "uint8"},
                         f"ld+bckd k={DEFAULT_TOPK} fp16": {"store_regions": "ld+bckd"}}.items():  # the default k
            store = work / f"{name.replace(' ', '-')}.zarr"
            result = run_dump(DumpConfig(teacher=path, out=str(store), data=DataConfig(images=images, ann=ann,
                                                                                      img_scale=args.img_scale),
                                         batch_size=args.batch_size, device=str(device), workers=args.workers, **kw),
                              progress=False)
            on_disk = sum(CacheReader(store).bytes_on_disk().values())
            dumps[name] = {"views_per_s": result["views"] / result["seconds"], "bytes_per_view": on_disk / num_views,
                           "dump_over_forward": (num_views / result["seconds"]) / (num_views / forward)}
            out = work / f"read-{name.replace(' ', '-')}.json"
            subprocess.run([sys.executable, "-m", "benchmarks.suite.read_throughput", "--cache", str(store),
                            "--workers-list", args.read_workers, "--seconds", str(args.read_seconds), "--repeats", "2",
                            "--out", str(out)],
                           check=True, capture_output=True, cwd=common.REPO_ROOT)
            reads[name] = {r["variant"]: r["views_per_s"] for r in json.loads(out.read_text())["rows"]}
    rows = []
    for mode, m in modes.items():
        rows.append({"mode": mode, "kb_per_view": m["bytes_per_view"] / 1024,
                     "x_dense_fp16": m["bytes_per_view"] / modes["dense fp16"]["bytes_per_view"],
                     "train2017_tib": m["bytes_per_view"] * TRAIN2017_IMAGES * 2 / 2**40,
                     "kl_mean": m["kl_mean"], "kl_p99": m["kl_p99"], "kl_max": m["kl_max"]})
    print(f"\n{common.environment(device)['device_name']}; {num_views} views of COCO-like images at "
          f"{args.img_scale[0]},{args.img_scale[1]}; R-101 width {args.teacher_width} (random weights, box logits "
          f"spread to std {args.box_logit_std:g} over the bins); bare teacher "
          f"forward {num_views / forward:.2f} views/s\n")
    print(common.markdown_table(rows, [("mode", "mode", ""), ("kb_per_view", "KB/view", ",.0f"),
                                       ("x_dense_fp16", "x dense fp16", ".3f"),
                                       ("train2017_tib", "train2017, 2 views (TiB, est.)", ".3f"),
                                       ("kl_mean", "KL mean", ".2e"), ("kl_p99", "KL p99", ".2e"),
                                       ("kl_max", "KL max", ".2e")]))
    dump_rows = [{"dump": k, **v, **{f"read {w}": reads[k].get(w) for w in reads[k]}} for k, v in dumps.items()]
    print("\n" + common.markdown_table(dump_rows, [("dump", "dump", ""), ("views_per_s", "views/s", ".2f"),
                                                    ("dump_over_forward", "dump / forward", ".3f"),
                                                    ("bytes_per_view", "bytes/view on disk", ",.0f")]))
    print("\n" + read_table(reads) + "\n\nan 8-GPU node needs: "
          + "; ".join(f"{k}: {v:.0f} views/s" for k, v in NODE_RATES.items()))
    common.write_results(args.out, args, rows, device, dumps=dumps, reads=reads, node_rates=NODE_RATES,
                         forward_views_per_s=num_views / forward, num_views=num_views, box_logit_factor=factor)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
