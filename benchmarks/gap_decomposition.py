"""Where does a teacher's AP advantage over a student lie: in its boxes or in its scores?

    .venv/bin/python benchmarks/gap_decomposition.py --teacher T.pt --student S.pt --images DIR --ann ANN.json

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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402

from detector.checkpoint import load_model  # noqa: E402
from data.coco import CocoDetection, collate  # noqa: E402
from detector.evaluation import coco_evaluate  # noqa: E402
from detector.inference import canvas_batches, coco_detections  # noqa: E402
from data.views import ViewSpec  # noqa: E402

SCRIPT = "gap_decomposition"
KEYS = ("AP", "AP50", "AP75", "APs")
COMBOS = {  # name -> (whose class logits, whose box logits)
    "student": ("student", "student"), "teacher": ("teacher", "teacher"),
    "student scores + teacher boxes": ("student", "teacher"), "teacher scores + student boxes": ("teacher", "student"),
}


@torch.no_grad()
def predictions(teacher_path: str, student_path: str, images: str, ann: str, img_scale: tuple[int, int],
                batch_size: int = 8) -> tuple[CocoDetection, dict[str, list[dict]]]:
    """-> (the dataset, {combo: COCO result dicts sorted by image}) for every entry of COMBOS."""
    models = {"teacher": load_model(teacher_path, role="teacher")[0], "student": load_model(student_path, role="student")[0]}
    configs = {k: m.config for k, m in models.items()}
    if configs["teacher"].strides != configs["student"].strides or configs["teacher"].reg_max != configs["student"].reg_max:
        raise SystemExit("error: teacher and student differ in strides or reg_max; their outputs do not line up")
    config = configs["student"]
    dataset = CocoDetection(images, ann, views=[ViewSpec(False, img_scale)], strides=config.strides, train=False)
    records = [dataset.view_record(i, 0) for i in range(len(dataset))]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[[(i, 0) for i in b] for b in canvas_batches(records, batch_size)],
                                         collate_fn=collate)

    def outputs():
        for batch in loader:
            maps = {k: m(batch.images) for k, m in models.items()}  # (cls per level, box per level)
            yield batch.records, {name: (maps[cls_from][0], maps[box_from][1]) for name, (cls_from, box_from) in COMBOS.items()}

    results = coco_detections(outputs(), config.strides, config.reg_max, dataset.label_to_cat_id)
    return dataset, {name: results.get(name, []) for name in COMBOS}


def decompose(teacher_path: str, student_path: str, images: str, ann: str, img_scale: tuple[int, int],
              batch_size: int = 8) -> dict[str, dict]:
    """-> {combo: COCO metrics} for every entry of COMBOS."""
    dataset, results = predictions(teacher_path, student_path, images, ann, img_scale, batch_size)
    return {name: coco_evaluate(ann, r, image_ids=dataset.image_ids) for name, r in results.items()}


def shares(metrics: dict[str, dict], key: str = "AP") -> dict[str, float | None]:
    """Share of the teacher - student gap in `key` that each swap recovers."""
    s, t = metrics["student"][key], metrics["teacher"][key]
    gap = t - s
    return {name: (m[key] - s) / gap if gap > 0 else None for name, m in metrics.items() if "+" in name}


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
