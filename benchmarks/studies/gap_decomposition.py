"""Where does a teacher's AP advantage over a student lie: in its boxes or in its scores?

    .venv/bin/python -m benchmarks.studies.gap_decomposition --teacher T.pt --student S.pt --images DIR --ann ANN.json

Both detectors run over the same images (equal canvases and strides, so their head outputs line
up location for location) and four detectors are scored with COCO AP: each model alone, the
student's class scores with the teacher's box distributions at the same locations ("teacher's
localization"), and the teacher's scores with the student's boxes ("teacher's scores"). The share
of the teacher-to-student gap that the teacher's boxes alone recover is the most that a
localization distillation (Main LD + VLR LD) can hope to transfer; what the scores recover is what
classification distillation would have to carry. Scores and boxes were trained together (the QFL
target is the IoU of a model's own boxes), so the two shares need not add up to one.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import common
from benchmarks.harness.gap import KEYS, decompose, shares

SCRIPT = "gap_decomposition"
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--ann", required=True)
    p.add_argument("--img-scale", type=common.parse_pair, default=(256, 256))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(common.RESULTS_DIR / f"{SCRIPT}.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = decompose(args.teacher, args.student, args.images, args.ann, tuple(args.img_scale), args.batch_size)
    rows = []
    for name, m in metrics.items():
        share = {k: shares(metrics, k).get(name) for k in ("AP", "AP50", "AP75")}
        rows.append({"detector": name, **{k: 100 * m[k] for k in KEYS}, **{f"share_{k}": v for k, v in share.items()}})
    columns = [("detector", "detector", "")] + [(k, k, ".1f") for k in KEYS] + \
              [(f"share_{k}", f"gap share {k}", ".2f") for k in ("AP", "AP50", "AP75")]
    print(common.markdown_table(rows, columns))
    common.write_results(args.out, args, rows, common.resolve_device("cpu"), metrics=metrics)


if __name__ == "__main__":
    main()
