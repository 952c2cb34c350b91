"""`ldcache demo`: the whole product on the synthetic data in one work folder, end to end.

make data -> train a teacher -> dump-teacher -> inspect-cache (+ picture) -> a plain student, an
LD student and a BCKD student, both distilled from the same cache -> one table. Every step leaves
its artefacts under the work folder and is skipped when they are already complete, so running the
demo again reuses what exists (a killed training run continues from its checkpoint)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from cache_teacher.dump import DumpConfig, run_dump
from cache_teacher.inspect import format_summary, render_png, summarize
from cache_teacher.reader import CacheReader
from cache_teacher.targets import CachedTeacher
from cache_teacher.verify import dataset_of_cache, teacher_ap
from core.config import param, validate_fields
from core.domains import Flag, Range
from core.errors import UserError
from core.paths import OutputPath
from core.runtime import Device
from data.builders import build_train_dataset
from data.config import DataConfig
from data.synthetic import make_synthetic
from detector.config import ModelConfig
from distill.config import LossConfig, TrainConfig
from distill.engine import run_train


@dataclass(frozen=True)
class DemoConfig:
    workdir: str = param("runs/demo", "every artefact goes here; a second run reuses finished steps", OutputPath("dir"))
    quick: bool = param(False, "a tiny version (under ~2 minutes on 2 CPU cores), for CI", Flag())
    device: str = param("auto", "auto (cuda when available), cpu, cuda or cuda:N", Device())
    workers: int = param(2, "DataLoader worker processes", Range(0, 256))

    def __post_init__(self):
        validate_fields(self, "demo configuration")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo. The models are the recipes in configs/synthetic-*.toml, shrunk to fit."""

    num_train: int
    num_val: int
    image_size: int
    teacher: dict  # ModelConfig fields
    student: dict
    teacher_epochs: int
    student_epochs: int
    batch_size: int = 8
    lr: float = 0.001


# The teacher has the student's depth at twice its width (3x its parameters) and trains twice as
# many steps: on 2 CPU cores that is the strongest teacher the time allows (a deeper one costs more
# per step than its extra capacity returns in so short a schedule).
TEACHER = dict(depth=18, base_width=32, fpn_channels=64, head_channels=64, stacked_convs=2, frozen_stages=0,
               norm_eval=False)
STUDENT = dict(depth=18, base_width=16, fpn_channels=64, head_channels=64, stacked_convs=2, frozen_stages=0,
               norm_eval=False)
PLANS = {
    # Sized for a few minutes per model on a 2-core CPU (README: 19 minutes in all, measured on busy cores).
    "full": DemoPlan(num_train=400, num_val=150, image_size=160, teacher=TEACHER, student=STUDENT,
                     teacher_epochs=20, student_epochs=10),
    "quick": DemoPlan(num_train=48, num_val=16, image_size=96,
                      teacher=dict(TEACHER, base_width=16, fpn_channels=32, head_channels=32, gn_groups=16),
                      student=dict(STUDENT, base_width=8, fpn_channels=32, head_channels=32, stacked_convs=1,
                                   gn_groups=16),
                      teacher_epochs=2, student_epochs=2),
}


def _train(name: str, workdir: Path, plan: DemoPlan, data: DataConfig, model: dict, epochs: int, device: str,
           workers: int, teacher=None, echo=print, loss: LossConfig = LossConfig()) -> dict:
    out = workdir / name
    if (out / "eval.json").exists():
        echo(f"  {name}: already trained, reusing {out}")
        return json.loads((out / "eval.json").read_text())
    dataset = build_train_dataset(data, ModelConfig().strides)
    train = TrainConfig(epochs=epochs, batch_size=plan.batch_size, optimizer="adamw", lr=plan.lr, weight_decay=0.05,
                        warmup_iters=50, device=device, workers=workers, log_every=5)
    # A recipe's default losses (the LD paper's, or BCKD's), normalised for any batch size and class count.
    run_train(data, ModelConfig(num_classes=dataset.num_classes, **model), train, loss, out,
              resume=True, dataset=dataset, teacher=teacher)
    return json.loads((out / "eval.json").read_text())


def run_demo(workdir: Path, quick: bool = False, device: str = "auto", workers: int = 2, echo=print) -> dict:
    plan = PLANS["quick" if quick else "full"]
    workdir = Path(workdir)
    _check_plan(workdir, plan)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "plan.json").write_text(json.dumps(plan.__dict__, indent=2) + "\n")
    started = time.perf_counter()
    steps = 7

    echo(f"[1/{steps}] synthetic dataset ({plan.num_train} train / {plan.num_val} val images, <= {plan.image_size} px)")
    root = workdir / "data"
    if not (root / "annotations" / "instances_val.json").exists():
        make_synthetic(root, num_train=plan.num_train, num_val=plan.num_val, image_size=plan.image_size, seed=0,
                       overwrite=root.exists(), workers=2)
    scale = (plan.image_size, plan.image_size)
    data = DataConfig(images=str(root / "train"), ann=str(root / "annotations" / "instances_train.json"),
                      val_images=str(root / "val"), val_ann=str(root / "annotations" / "instances_val.json"),
                      img_scale=scale)

    echo(f"[2/{steps}] teacher: GFL {_describe(plan.teacher)}, {plan.teacher_epochs} epochs")
    teacher_eval = _train("teacher", workdir, plan, data, plan.teacher, plan.teacher_epochs, device, workers, echo=echo)

    echo(f"[3/{steps}] dump-teacher: every view (orig, hflip) of every training image, once")
    cache_dir = workdir / "teacher-cache.zarr"
    dump = run_dump(DumpConfig(teacher=str(workdir / "teacher" / "checkpoints" / "last.pt"), out=str(cache_dir),
                               data=DataConfig(images=data.images, ann=data.ann, img_scale=scale), device=device,
                               workers=workers, shard_mb=8.0))
    cache = CacheReader(cache_dir)

    echo(f"[4/{steps}] inspect-cache")
    summary = summarize(cache)
    echo(format_summary(summary))
    from_cache = teacher_ap(cache, dataset_of_cache(cache, None, None))["metrics"]
    echo(f"  the teacher's AP from the cache alone, on its {summary['images']} training images: "
         f"{100 * from_cache['AP']:.1f} (AP50 {100 * from_cache['AP50']:.1f}); no teacher forward")
    picture = render_png(cache, _interesting_view(cache, data.ann), workdir / "cache-view.png")
    echo(f"  picture of a cached view -> {picture}")

    echo(f"[5/{steps}] plain student: GFL {_describe(plan.student)}, {plan.student_epochs} epochs, no teacher")
    plain_eval = _train("student-plain", workdir, plan, data, plan.student, plan.student_epochs, device, workers,
                        echo=echo)

    echo(f"[6/{steps}] LD student from the cache: Main LD + VLR LD + Main KD, same schedule and seed")
    ld_eval = _train("student-ld", workdir, plan, data, plan.student, plan.student_epochs, device, workers,
                     teacher=CachedTeacher(cache), echo=echo)

    echo(f"[7/{steps}] BCKD student from the same cache (--recipe bckd): its classification and box KD at every "
         "location, same schedule and seed")
    bckd_eval = _train("student-bckd", workdir, plan, data, plan.student, plan.student_epochs, device, workers,
                       teacher=CachedTeacher(cache), echo=echo, loss=LossConfig(recipe="bckd"))

    images_seen = plan.student_epochs * summary["images"]
    rows = [
        {"model": f"teacher {_describe(plan.teacher)}", **_row(teacher_eval), "teacher forwards avoided": "-"},
        {"model": f"student {_describe(plan.student)}, no distillation", **_row(plain_eval),
         "teacher forwards avoided": "-"},
        {"model": f"student {_describe(plan.student)}, LD from the cache", **_row(ld_eval),
         "teacher forwards avoided": f"{images_seen:,}"},
        {"model": f"student {_describe(plan.student)}, BCKD from the same cache", **_row(bckd_eval),
         "teacher forwards avoided": f"{images_seen:,}"},
    ]
    report = {"workdir": str(workdir), "plan": plan.__dict__, "rows": rows, "teacher_ap_from_cache": from_cache,
              "cache": {"location": str(cache_dir), "bytes": summary["bytes_on_disk_total"], "views": summary["views"],
                        "dump_seconds": dump["seconds"]},
              "picture": str(picture), "seconds": time.perf_counter() - started}
    table = format_table(report)
    (workdir / "demo.md").write_text(table + "\n")
    (workdir / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    return {**report, "table": table}


def _check_plan(workdir: Path, plan: DemoPlan) -> None:
    """Every step reuses what the work folder holds: the demo of another plan (--quick or not) would
    reuse its data, teacher and students and print them under this plan's names."""
    def as_json(p: DemoPlan) -> dict:
        return json.loads(json.dumps(p.__dict__))

    for name, key in (("plan.json", None), ("demo.json", "plan")):  # demo.json: a demo from before plan.json
        path = workdir / name
        if path.is_file():
            recorded = json.loads(path.read_text())
            recorded = recorded.get(key) if key else recorded
            if recorded is not None and recorded != as_json(plan):
                other = ("the --quick demo" if recorded == as_json(PLANS["quick"]) else
                         "the full demo" if recorded == as_json(PLANS["full"]) else "another demo")
                raise UserError(f"{workdir} holds the artefacts of {other}, which this one would reuse as its own; "
                                f"pass another --workdir or delete {workdir}")
            return


def _describe(model: dict) -> str:
    head = f"{model['head_channels']}x{model['stacked_convs']}"
    return f"{ModelConfig(**model).backbone_name}, head {head}"


def _row(ev: dict) -> dict:
    m = ev["metrics"]
    return {"AP": 100 * m["AP"], "AP50": 100 * m["AP50"], "AP75": 100 * m["AP75"], "train s": ev["train_seconds"]}


def format_table(report: dict) -> str:
    lines = ["| model | AP | AP50 | AP75 | train time | teacher forwards avoided |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} | {r['train s'] / 60:.1f} min | "
            f"{r['teacher forwards avoided']} |"
        )
    c = report["cache"]
    lines.append("")
    lines.append(
        f"cache: {c['views']:,} views, {c['bytes'] / 2**20:,.1f} MiB on disk, dumped in {c['dump_seconds']:.0f} s "
        f"-> {c['location']}"
    )
    lines.append(f"work folder: {report['workdir']} (everything above lives there; run again to reuse it)")
    return "\n".join(lines)


def _interesting_view(cache: CacheReader, ann_file: str) -> int:
    """The original view of the training image with the most objects: a busy picture shows more."""
    counts: dict[int, int] = {}
    for ann in json.loads(Path(ann_file).read_text())["annotations"]:
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    ids = [int(i) for i in cache.image_ids]
    best = max(range(len(ids)), key=lambda k: counts.get(ids[k], 0))
    return cache.view_index(best, 0)
