"""How much smaller is a region-sparse cache? From the annotations alone, no teacher needed.

    .venv/bin/python -m benchmarks.suite.sparse_size                                   # the synthetic default
    .venv/bin/python -m benchmarks.suite.sparse_size --images coco/train2017 \\
        --ann coco/annotations/instances_train2017.json --img-scale 1333,800 --workers 8   # COCO

For every view (orig and hflip at --img-scale) it counts the rows a `--store-regions main+vlr`
dump would store (ATSS positives plus the VLR band for every gamma >= --min-vlr-gamma) against the
dense rows, and turns the counts into bytes per view and in total for fp16 box + class logits (and
box only), using the dataset's class count. The same planning code the dump runs (ATSS per view)
is used, so the counts are exact for the given annotations; no image is read.

Without the COCO annotation file, `--coco-like N` writes N images of annotations drawn from COCO
train2017's published statistics (640x480 images, landscape 3 in 4; 7.3 objects per image,
geometric; 41% small / 34% medium / 24% large boxes by area; log-normal aspect ratios; 80
classes) and plans those at 1333,800: an estimate of COCO's sparse fraction, not a measurement.
Run the command above on the real file for the exact figure.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import common
from benchmarks.harness.coco_like import write_coco_like
from cache_teacher.plan import plan_region_rows
from data.coco import CocoDetection
from data.views import parse_views


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", help="image folder (only listed, never read) [default: synthetic train]")
    p.add_argument("--ann", help="annotation json [default: synthetic train]")
    p.add_argument(
        "--img-scale", type=common.parse_pair, help="LONG,SHORT [default: 256,256; 1333,800 with --coco-like]"
    )
    p.add_argument("--views", default="orig,hflip")
    p.add_argument("--min-vlr-gamma", type=float, nargs="+", default=[0.25, 0.0, 0.5])
    p.add_argument("--vlr-iou", default="official")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of --coco-like")
    p.add_argument("--coco-like", type=int, metavar="N",
                   help="estimate COCO from its published statistics with N generated images (see above)")
    p.add_argument("--out", help="result JSON [default: benchmarks/results/sparse_size[_coco_like].json]")
    args = p.parse_args()
    if args.out is None:
        args.out = str(common.RESULTS_DIR / ("sparse_size_coco_like.json" if args.coco_like else "sparse_size.json"))
    if args.coco_like:
        import tempfile

        args.ann = str(write_coco_like(args.coco_like, Path(tempfile.mkdtemp()) / "coco_like.json", args.seed))
        args.images = str(Path(args.ann).parent)  # only listed, never read
    elif args.ann is None:
        from data.synthetic import ensure_synthetic_default

        root = ensure_synthetic_default()
        args.images, args.ann = str(root / "train"), str(root / "annotations" / "instances_train.json")
    if args.img_scale is None:
        args.img_scale = (1333, 800) if args.coco_like else (256, 256)
    dataset = CocoDetection(args.images, args.ann, views=parse_views(args.views, args.img_scale), train=True)
    dense = np.array([[dataset.view_record(i, s).num_rows for s in range(len(dataset.views))]
                      for i in range(len(dataset))], dtype=np.int64)
    c = dataset.num_classes
    row_bytes = {"box+cls fp16": 2 * (68 + c), "box fp16": 2 * 68}
    rows = []
    for gamma in args.min_vlr_gamma:
        start = time.perf_counter()
        stored = np.array([[len(r) for r in per_image] for per_image in
                           plan_region_rows(dataset, gamma, args.vlr_iou, args.workers, progress=True)], dtype=np.int64)
        seconds = time.perf_counter() - start
        views = stored.size
        row = {"min_vlr_gamma": gamma, "images": len(dataset), "views": views,
               "dense_rows_per_view": dense.sum() / views, "stored_rows_per_view": stored.sum() / views,
               "fraction": stored.sum() / dense.sum(), "plan_seconds": seconds}
        for kind, nbytes in row_bytes.items():
            row[f"dense MB/view {kind}"] = dense.sum() / views * nbytes / 2**20
            row[f"sparse MB/view {kind}"] = (stored.sum() / views * (nbytes + 4)) / 2**20  # + the int32 location
            row[f"dense GB total {kind}"] = dense.sum() * nbytes / 2**30
            row[f"sparse GB total {kind}"] = stored.sum() * (nbytes + 4) / 2**30
        rows.append(row)
    columns = [
        ("min_vlr_gamma", "min gamma", ""),
        ("views", "views", ","),
        ("dense_rows_per_view", "dense rows/view", ",.0f"),
        ("stored_rows_per_view", "sparse rows/view", ",.0f"),
        ("fraction", "fraction", ".3f"),
        ("dense GB total box+cls fp16", "dense GB", ".3f"),
        ("sparse GB total box+cls fp16", "sparse GB", ".3f"),
        ("plan_seconds", "planning s", ".1f"),
    ]
    print(common.markdown_table(rows, columns))
    common.write_results(args.out, args, rows, common.resolve_device("cpu"),
                         data={"images": args.images, "ann": args.ann, "num_classes": c})


if __name__ == "__main__":
    main()
