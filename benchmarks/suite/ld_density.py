"""How much distillation signal does an image carry? Objects, ATSS positives and VLR weight per
image, and where its box edges sit in the bins, from the annotations alone (no model): what LD's default
normalisation and temperature rest on.

    .venv/bin/python -m benchmarks.suite.ld_density                        # synthetic default + COCO-like
    .venv/bin/python -m benchmarks.suite.ld_density --dataset dense1=ANN.json:IMAGES:192 ...

Main LD is a sum over the ATSS positives of their KL (weighted by the student's score) and VLR LD a
sum over the VLR band weighted by IoU; GIoU and DFL are means over the positives. So under the
"image" normalisation (sum per image x 2) the LD-to-GIoU balance moves with positives per image,
under "positive" it does not. The table says by how much each dataset's density differs from
COCO's (the setting the paper's weights were tuned on). COCO-like: annotations drawn from COCO
train2017's published statistics at 1333x800 (benchmarks/suite/sparse_size.py), an estimate.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.harness import common
from benchmarks.harness.coco_like import write_coco_like
from data.coco import CocoDetection
from data.views import parse_views
from detector.atss import assign_view
from detector.regions import vlr_region
from distill.config import LossConfig
from distill.geometry import positive_edge_distances


def density(dataset: CocoDetection, gamma: float, max_images: int) -> dict:
    """Per-image means over the original views of the first max_images images."""
    n = min(len(dataset), max_images)
    objects = positives = vlr = 0.0
    for i in range(n):
        _, boxes, assign = assign_view(dataset, i)
        if len(boxes) == 0:
            continue
        objects += len(boxes)
        positives += assign.pos.numel()
        vlr += float(vlr_region(assign, gamma).weights.sum())
    edges = positive_edge_distances(dataset, dataset.strides, 16, max_images)  # the LD temperature rule reads this
    return {"images": n, "objects_per_image": objects / n, "positives_per_image": positives / n,
            "vlr_weight_per_image": vlr / n, "positives_per_object": positives / max(objects, 1),
            "median_edge_bins": float(edges.median()),
            "ld_temperature": LossConfig().for_edges(float(edges.median())).ld_temperature}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=ANN:IMAGES:SIZE",
                   help="another dataset (annotation json, image folder, square img-scale); repeatable")
    p.add_argument("--max-images", type=int, default=500)
    p.add_argument("--vlr-gamma", type=float, default=0.25)
    p.add_argument("--coco-like", type=int, default=500, metavar="N", help="COCO-like images to draw (0: none)")
    p.add_argument("--no-synthetic-default", action="store_true", help="leave the synthetic default out")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "ld_density.json"))
    args = p.parse_args()
    specs = []
    if not args.no_synthetic_default:
        from data.synthetic import synthetic_split

        images, ann = synthetic_split("train")
        specs.append(("synthetic default @256", str(images), str(ann), (256, 256)))
    if args.coco_like:
        coco_ann = write_coco_like(args.coco_like, Path(tempfile.mkdtemp()) / "coco_like.json", seed=0)
        specs.insert(0, ("COCO-like @1333x800", str(coco_ann.parent), str(coco_ann), (1333, 800)))
    for spec in args.dataset:
        name, rest = spec.split("=", 1)
        a, im, size = rest.rsplit(":", 2)
        specs.append((f"{name} @{size}", im, a, (int(size), int(size))))
    rows = []
    for name, im, a, scale in specs:
        dataset = CocoDetection(im, a, views=parse_views("orig", scale), train=True)
        rows.append(
            {"dataset": name, "classes": dataset.num_classes, **density(dataset, args.vlr_gamma, args.max_images)}
        )
    ref = rows[0]
    for r in rows:
        r["positives_vs_first"] = r["positives_per_image"] / ref["positives_per_image"]
        r["vlr_vs_first"] = r["vlr_weight_per_image"] / ref["vlr_weight_per_image"]
    columns = [("dataset", "dataset", ""), ("classes", "classes", ""), ("objects_per_image", "objects/img", ".1f"),
               ("positives_per_image", "positives/img", ".1f"), ("positives_per_object", "positives/object", ".1f"),
               ("vlr_weight_per_image", "VLR weight/img", ".1f"), ("positives_vs_first", "positives vs first", ".2f"),
               ("vlr_vs_first", "VLR vs first", ".2f"), ("median_edge_bins", "median positive edge (bins)", ".2f"),
               ("ld_temperature", "default LD temperature", "g")]
    print(common.markdown_table(rows, columns))
    common.write_results(args.out, args, rows, common.resolve_device("cpu"))


if __name__ == "__main__":
    main()
