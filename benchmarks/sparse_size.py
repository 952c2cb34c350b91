"""How much smaller is a region-sparse cache? From the annotations alone, no teacher needed.

    .venv/bin/python benchmarks/sparse_size.py                                   # the synthetic default
    .venv/bin/python benchmarks/sparse_size.py --images coco/train2017 \\
        --ann coco/annotations/instances_train2017.json --img-scale 1333,800 --workers 8   # COCO

For every view (orig and hflip at --img-scale) it counts the rows a `--store-regions main+vlr`
dump would store (ATSS positives plus the VLR band for every gamma >= --min-vlr-gamma) against the
dense rows, and turns the counts into bytes per view and in total for fp16 box + class logits (and
box only), using the dataset's class count. The same planning code the dump runs (ATSS per view)
is used, so the counts are exact, not estimates; no image is read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)
import numpy as np  # noqa: E402

from cache_teacher.dump import plan_region_rows  # noqa: E402
from detector.coco import CocoDetection  # noqa: E402
from detector.views import parse_views  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", help="image folder (only listed, never read) [default: synthetic train]")
    p.add_argument("--ann", help="annotation json [default: synthetic train]")
    p.add_argument("--img-scale", type=common.parse_pair, default=(256, 256))
    p.add_argument("--views", default="orig,hflip")
    p.add_argument("--min-vlr-gamma", type=float, nargs="+", default=[0.25, 0.0, 0.5])
    p.add_argument("--vlr-iou", default="official")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(common.RESULTS_DIR / "sparse_size.json"))
    args = p.parse_args()
    if args.ann is None:
        from detector.synthetic import ensure_synthetic_default

        root = ensure_synthetic_default()
        args.images, args.ann = str(root / "train"), str(root / "annotations" / "instances_train.json")
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
    columns = [("min_vlr_gamma", "min gamma", ""), ("views", "views", ","), ("dense_rows_per_view", "dense rows/view", ",.0f"),
               ("stored_rows_per_view", "sparse rows/view", ",.0f"), ("fraction", "fraction", ".3f"),
               ("dense GB total box+cls fp16", "dense GB", ".3f"), ("sparse GB total box+cls fp16", "sparse GB", ".3f"),
               ("plan_seconds", "planning s", ".1f")]
    print(common.markdown_table(rows, columns))
    common.write_results(args.out, args, rows, common.resolve_device("cpu"),
                         data={"images": args.images, "ann": args.ann, "num_classes": c})


if __name__ == "__main__":
    main()
