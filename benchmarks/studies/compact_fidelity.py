"""How faithful is an ld+bckd cache's compact storage to each distillation term? Trained teachers,
trained students, every term computed from dense fp16 rows and from what ld+bckd stores.

    .venv/bin/python -m benchmarks.studies.compact_fidelity --workdir runs/distill_methods   # after its teachers

For each dataset of a distill_methods work folder with a trained teacher and plain student (seed 0):
the teacher's fresh rows on --views training views (batches of equal canvases), stored two ways:
dense fp16 (the reference cache) and ld+bckd (box logits in fp16 or uint8 at the rows LD reads,
fp16 expected edges at every location, the top k class logits + a floor, for k = 1, 2, 4, 8); the
plain student's outputs on the same views; every loss term (Main LD, VLR LD, Main KD, BCKD
classification, BCKD box) from both, and the relative error of the compact one. No training: the
error a student sees at its first step, on data a teacher was trained for (a random teacher's
near-uniform class logits would exaggerate the top-k error; its near-flat boxes would hide the
rest). Each row names the day, commit and teacher (weights sha256) it was measured with; a
dataset whose teacher is not in the work folder now keeps its rows from --out (--fresh drops them),
so datasets can be measured on different machines.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.harness import common
from benchmarks.harness.ledger import git_head, weights_sha256
from cache_teacher.codec import decode_rows, decode_topk, encode_edges, encode_rows, encode_topk
from data.coco import CocoDetection, collate
from data.views import parse_views
from detector.checkpoint import load_model
from detector.rows import TeacherRows, flatten_rows
from distill.config import LossConfig
from distill.criterion import compute_losses

SCRIPT = "compact_fidelity"
TERMS = ("loss_ld", "loss_ld_vlr", "loss_kd", "loss_bckd_cls", "loss_bckd_box")
# Every term at once: the paper's LD recipe and BCKD's weights (the combination's terms)
ALL_TERMS = LossConfig(recipe="paper", bckd_cls_weight=1.0, bckd_box_weight=4.0, ld_temperature=10.0)
TOPKS = (1, 2, 4, 8)


def stored(box: torch.Tensor, cls: torch.Tensor, reg_max: int, mode: tuple | None) -> TeacherRows:
    """The teacher rows a student would read: dense fp16 (mode None) or ld+bckd (box dtype, k)."""
    if mode is None:
        return TeacherRows(box.half().float(), cls.half().float())
    box_dtype, k = mode
    enc = encode_rows(box, box_dtype, reg_max)
    topk = encode_topk(cls, k)
    return TeacherRows(decode_rows(enc["data"], enc.get("lo"), enc.get("scale")),
                       decode_topk(topk["topk"], topk["index"], topk["floor"], cls.shape[1]),
                       edges=encode_edges(box, reg_max).float())


@torch.no_grad()
def measure(teacher_path: str, student_path: str, images: str, ann: str, num_views: int, batch: int) -> dict:
    teacher, tcfg = load_model(teacher_path, {}, torch.device("cpu"))
    student, _ = load_model(student_path, {}, torch.device("cpu"))
    dataset = CocoDetection(images, ann, views=parse_views("orig,hflip", (160, 160)), strides=tcfg.strides, train=True)
    keys, _ = common.dump_batches(dataset, tcfg, "float16", "float16", 64.0, batch)
    keys = keys[::max(1, len(keys) * batch // max(num_views, 1))]  # spread over the canvas sizes
    modes = {"dense fp16": None, **{f"ld+bckd k={k} {n}": (d, k) for k in TOPKS for n, d in (("fp16", "float16"),
                                                                                                  ("uint8", "uint8"))}}
    sums = {m: dict.fromkeys(TERMS, 0.0) for m in modes}
    seen = 0
    for views in keys:
        if seen >= num_views:
            break
        b = collate([dataset[k] for k in views])
        level_hw = [r.level_hw for r in b.records]
        t_cls, t_box = teacher(b.images)
        s_cls, s_box = student(b.images)
        box, cls = flatten_rows(t_box, level_hw).float(), flatten_rows(t_cls, level_hw).float()
        for mode, spec in modes.items():
            losses = compute_losses(s_cls, s_box, level_hw, b.boxes, b.labels, ALL_TERMS, tcfg.num_classes,
                                    tcfg.reg_max, tcfg.strides, teacher_rows=stored(box, cls, tcfg.reg_max, spec))
            for term in TERMS:  # unweighted: divide the weight out
                weight = getattr(ALL_TERMS, {"loss_ld": "ld_weight", "loss_ld_vlr": "vlr_weight",
                                             "loss_kd": "kd_weight", "loss_bckd_cls": "bckd_cls_weight",
                                             "loss_bckd_box": "bckd_box_weight"}[term])
                sums[mode][term] += float(losses[term]) / weight
        seen += len(views)
    reference = sums["dense fp16"]
    return {"views": seen, "classes": tcfg.num_classes,
            "error": {m: {t: abs(sums[m][t] - reference[t]) / max(abs(reference[t]), 1e-12) for t in TERMS}
                      for m in modes if m != "dense fp16"}, "reference": reference}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(common.REPO_ROOT / "runs" / "distill_methods"))
    p.add_argument("--views", type=int, default=64, help="training views per dataset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(common.RESULTS_DIR / f"{SCRIPT}.json"))
    p.add_argument("--fresh", action="store_true",
                   help="drop the rows --out holds (by default a dataset not measured now keeps its rows there)")
    args = p.parse_args()
    common.apply_threads(args)
    work, rows = Path(args.workdir), []
    when = {"date": datetime.now(UTC).date().isoformat(), "git": git_head()}
    for root in sorted(d for d in work.iterdir() if (d / "teacher" / "checkpoints" / "last.pt").is_file()):
        student = root / "plain-s0" / "checkpoints" / "last.pt"
        data = work / "data" / root.name
        if not student.is_file():
            continue
        teacher = root / "teacher" / "checkpoints" / "last.pt"
        r = measure(str(teacher), str(student), str(data / "train"),
                    str(data / "annotations" / "instances_train.json"), args.views, args.batch_size)
        for mode, errors in r["error"].items():
            rows.append({"dataset": root.name, "classes": r["classes"], "mode": mode, "views": r["views"],
                         **{f"err {t.removeprefix('loss_')}": e for t, e in errors.items()},
                         "measured": when, "teacher_sha256": weights_sha256(teacher)})
        print(f"{root.name}: {r['views']} views", file=sys.stderr)
    out = Path(args.out)
    if out.is_file() and not args.fresh:  # the datasets whose teachers are not in this work folder now
        now = {r["dataset"] for r in rows}
        rows = sorted([r for r in json.loads(out.read_text())["rows"] if r["dataset"] not in now] + rows,
                      key=lambda r: r["dataset"])
    for r in rows:
        r["when"] = r.get("measured", {}).get("date", "before fe4cba4")
    columns = [("dataset", "dataset", ""), ("classes", "classes", ""), ("mode", "stored as", ""),
               ("when", "measured", "")]
    columns += [(f"err {t.removeprefix('loss_')}", f"{t.removeprefix('loss_')} rel. error", ".2%") for t in TERMS]
    print(common.markdown_table(rows, columns))
    common.write_results(args.out, args, rows, torch.device("cpu"))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
