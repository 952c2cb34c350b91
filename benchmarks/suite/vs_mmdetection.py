"""Student steps side by side with mmdetection's own, in one run, on the same random batch.

    bash ../shared/tools/mmdet_oracle/make_venv.sh /tmp/mmdet_venv       # once: mmdetection 3.3.0 on CPU
    .venv/bin/python -m benchmarks.suite.vs_mmdetection                           # CPU: 640x640, batch 2, 2 threads
    .venv/bin/python -m benchmarks.suite.vs_mmdetection --device cuda --amp --img-scale 1344,800 --batch-size 8

Five steps, each model.loss/our train_step + backward + SGD on B images of --img-scale with ~7 GT
boxes each (80 classes), full-width models with random weights, the same threads on both sides:
  (a) mmdet GFL R-18                    mmdetection's gfl_r50_fpn_1x_coco with depth 18
  (b) mmdet LD R-18 <- R-101 online     its ld_r18-gflv1-r101_fpn_1x_coco (Main LD, teacher every step)
  (c) ours, plain R-18                  distill.step.train_step, no teacher
  (d) ours, R-18 from cached rows       the full recipe (Main LD + VLR LD + Main KD) from fp16 rows of
                                        the teacher (computed once, decoded on the device every step
                                        as from a cache; the cache's own reads are benchmarked apart)
  (e) ours, R-18 <- R-101 online        the full recipe with our teacher run every step
Each variant runs in a process of its own that holds only its model, as a training job would
(benchmarks/harness/step_worker.py; mmdetection's in its venv through benchmarks/harness/mmdet_side.py, ours in this
one through --serve), so no step inherits another's allocator state or threads. The driver
alternates a, b, c, d, e (reversed every other round) for --rounds rounds; the table gives the
median ms per step over rounds, each ratio is the median over rounds of the ratio within a round
(variants of a round run back to back), and --profile compares (c) with (a) operator by operator.
Goals: (d) >= 0.95 x (c) in steps/s; (d) at most half of (b)'s time; (c) no slower than (a).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import common, step_worker
from benchmarks.harness.batches import CachedRows, random_batch
from data.coco import Batch
from detector.config import ModelConfig
from detector.model import build_detector
from detector.rows import flatten_rows
from distill.config import LossConfig
from distill.criterion import build_criterion
from distill.step import Learner, train_step
from distill.teachers import OnlineTeacher

SCRIPT = "vs_mmdetection"
VARIANTS = ("mmdet_gfl", "mmdet_ld", "ours_plain", "ours_cache", "ours_online")
NAMES = {"mmdet_gfl": "gfl", "mmdet_ld": "ld", "ours_plain": "ours_plain", "ours_cache": "ours_cache",
         "ours_online": "ours_online"}  # what each variant's worker builds
LABELS = {"mmdet_gfl": "(a) mmdet GFL R-18", "mmdet_ld": "(b) mmdet LD R-18 <- R-101 online",
          "ours_plain": "(c) ours plain R-18", "ours_cache": "(d) ours R-18 from cached rows",
          "ours_online": "(e) ours R-18 <- R-101 online"}


def build_step(variant: str, batch: Batch, device: torch.device, amp: str):
    """Our train step for one variant, as a training job would hold it: the student (seeded as every
    variant's), SGD, and for (d) the teacher's fp16 rows (the teacher is run once and dropped) or
    for (e) the teacher itself."""
    student_cfg = ModelConfig(depth=18, num_classes=80)  # mmdet's GFL widths, stem + stage 1 frozen
    teacher_source = None
    if variant != "ours_plain":
        torch.manual_seed(1)
        teacher = build_detector(ModelConfig(depth=101, num_classes=80)).to(device).eval()
        if variant == "ours_cache":
            with torch.no_grad():
                cls_maps, box_maps = teacher(batch.images.to(device))
            level_hw = [r.level_hw for r in batch.records]
            teacher_source = CachedRows({"box": flatten_rows(box_maps, level_hw).half().cpu().numpy(),
                                         "cls": flatten_rows(cls_maps, level_hw).half().cpu().numpy()})
            del teacher, cls_maps, box_maps
        else:
            teacher_source = OnlineTeacher(teacher, teacher.config, "random", amp=amp)
    torch.manual_seed(0)
    model = build_detector(student_cfg).to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    learner = Learner(model, optimizer, scaler, build_criterion(LossConfig(), student_cfg), device, amp, teacher_source)
    iterations = itertools.count()

    def step() -> None:
        train_step(learner, (batch, None), 1e-4, next(iterations))  # its one read-out synchronises

    return step, {"torch": torch.__version__}


def serve(args) -> None:
    """Our side's worker (--serve): one variant per process, answering step_worker's commands."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    w, h = args.img_scale
    batch, _ = random_batch(args.batch_size, h, w, ModelConfig().strides)
    step_worker.serve(lambda variant: build_step(variant, batch, device, "bf16" if args.amp else "off"), device)


class Worker:
    """A step_worker process holding one variant's model, driven over its stdin/stdout."""

    def __init__(self, command: list[str], what: str):
        self.what = what
        # from the repository root: `python -m benchmarks...` finds the package there (the mmdetection
        # venv has nothing of ours installed)
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=common.REPO_ROOT)

    def ask(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"error: the worker for {self.what} stopped; run it by hand to see why")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def verdict(rounds: list[float], goal: float, at_least: bool = False) -> str:
    """'met' when the median of the rounds' ratios meets the goal; 'within noise' when it does not but
    the goal lies between their quartiles (so that one disturbed round cannot decide); else 'NOT met'."""
    median = statistics.median(rounds)
    if (median >= goal) if at_least else (median <= goal):
        return "met"
    low, _, high = statistics.quantiles(rounds, n=4, method="inclusive") if len(rounds) > 1 else [median] * 3
    return "within noise" if low <= goal <= high else "NOT met"


def op_differences(ours: dict, theirs: dict, top: int) -> list[dict]:
    """The operators whose self time differs most between two profiles (ms per step, ours - theirs)."""
    rows = []
    for op in set(ours) | set(theirs):
        a, b = ours.get(op, [0.0, 0.0]), theirs.get(op, [0.0, 0.0])
        rows.append({"op": op, "ours_ms": a[0], "theirs_ms": b[0], "diff_ms": a[0] - b[0],
                     "ours_calls": a[1], "theirs_calls": b[1]})
    return sorted(rows, key=lambda r: -abs(r["diff_ms"]))[:top]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mmdet-python", default=os.environ.get("MMDET_PYTHON", "/tmp/mmdet_venv/bin/python"),
                   help="the Python of the mmdetection venv (../shared/tools/mmdet_oracle/make_venv.sh)")
    p.add_argument("--img-scale", type=common.parse_pair, default=(640, 640), help="W,H of the batch's images")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same on both sides (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on both sides (CUDA)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", type=int, default=2, metavar="STEPS",
                   help="after the rounds, profile STEPS steps of every variant (torch.profiler) and compare "
                        "(c) with (a) operator by operator; 0: no profile")
    p.add_argument("--out", default=str(common.RESULTS_DIR / f"{SCRIPT}.json"))
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # our side's worker process
    args = p.parse_args()
    if args.serve:
        return serve(args)
    if not Path(args.mmdet_python).exists():
        sys.exit(f"error: no mmdetection venv at {args.mmdet_python}; build it with "
                 "bash ../shared/tools/mmdet_oracle/make_venv.sh /tmp/mmdet_venv (or pass --mmdet-python)")
    device = common.resolve_device(args.device)
    w, h = args.img_scale
    _, saved = random_batch(args.batch_size, h, w, ModelConfig().strides)
    shared = ["--threads", str(args.threads), "--device", args.device, *(["--amp"] if args.amp else [])]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(saved, Path(tmp) / "batch.pt")
        workers, built = {}, {}
        try:
            for variant in VARIANTS:  # one process per variant, built one after the other
                if variant.startswith("mmdet"):
                    command = [args.mmdet_python, "-m", "benchmarks.harness.mmdet_side",
                               "--batch", str(Path(tmp) / "batch.pt"), *shared]
                else:
                    command = [sys.executable, "-m", "benchmarks.suite.vs_mmdetection", "--serve", "--img-scale",
                               f"{w},{h}", "--batch-size", str(args.batch_size), *shared]
                workers[variant] = Worker(command, LABELS[variant])
                built[variant] = workers[variant].ask({"build": NAMES[variant]})
            runs = {v: [] for v in VARIANTS}
            faults = {v: [] for v in VARIANTS}
            for rnd in range(args.rounds):
                for variant in VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]:  # no variant always first or last
                    answer = workers[variant].ask({"time": NAMES[variant], "steps": args.steps, "warmup": args.warmup})
                    runs[variant].append(statistics.median(answer["ms_per_step"]))
                    faults[variant].append(answer["minflt_per_step"])
                    print(
                        f"[{rnd}] {LABELS[variant]:36s} {runs[variant][-1]:9.1f} ms/step", file=sys.stderr, flush=True
                    )
            profiles = {}
            if args.profile:
                for variant in VARIANTS:
                    profiles[variant] = workers[variant].ask({"profile": NAMES[variant], "steps": args.profile})["ops"]
            for worker in workers.values():
                worker.close()
        finally:  # a worker that stopped or an interrupt leaves no other worker behind
            for worker in workers.values():
                worker.kill()
    ms = {v: statistics.median(r) for v, r in runs.items()}

    def per_round(a: str, b: str) -> list[float]:
        """a / b in every round, the two variants run back to back."""
        return [x / y for x, y in zip(runs[a], runs[b])]

    def ratio(a: str, b: str) -> tuple[float, float, float]:
        """Median, min and max over rounds of a / b."""
        r = per_round(a, b)
        return statistics.median(r), min(r), max(r)

    def self_ms(variant: str) -> float | None:
        return sum(v[0] for v in profiles[variant].values()) if profiles else None

    def calls(variant: str) -> float | None:
        return sum(v[1] for v in profiles[variant].values()) if profiles else None

    rows = [{"variant": LABELS[v], "ms_per_step": ms[v], "steps_per_s": 1000 / ms[v],
             "x_mmdet_plain": ratio(v, "mmdet_gfl")[0], "minflt_per_step": statistics.median(faults[v]),
             "profiled_self_ms": self_ms(v), "profiled_ops": calls(v), "rounds_ms": runs[v]} for v in VARIANTS]
    spreads = {"cache_vs_plain_steps_per_s": ratio("ours_plain", "ours_cache"),
               "cache_vs_mmdet_ld_time": ratio("ours_cache", "mmdet_ld"),
               "plain_vs_mmdet_plain_time": ratio("ours_plain", "mmdet_gfl")}
    goals = {k: v[0] for k, v in spreads.items()}
    goals["range_over_rounds"] = {k: v[1:] for k, v in spreads.items()}
    goals["met"] = {"(d)/(c) >= 0.95 in steps/s": verdict(per_round("ours_plain", "ours_cache"), 0.95, at_least=True),
                    "(d) <= 0.5 x (b)": verdict(per_round("ours_cache", "mmdet_ld"), 0.5),
                    "(c) <= (a)": verdict(per_round("ours_plain", "mmdet_gfl"), 1.0)}
    env = common.environment(device)
    versions = built["mmdet_gfl"]
    print(f"\n{env['device_name']}; {args.batch_size} x {w}x{h}, {args.threads} threads a side, amp "
          f"{'bf16' if args.amp else 'off'}; {versions['mmdet']} mmdetection, torch {versions['torch']}; a process "
          f"per variant; median of {args.rounds} alternating rounds of {args.steps} steps; ratios: median over "
          "rounds of the ratio within a round\n")
    columns = [("variant", "step", ""), ("ms_per_step", "ms/step", ".0f"), ("steps_per_s", "steps/s", ".3f"),
               ("x_mmdet_plain", "x (a)", ".2f"), ("minflt_per_step", "page faults/step", ".0f")]
    if profiles:
        columns += [("profiled_self_ms", "profiled self ms/step", ".0f"), ("profiled_ops", "ops/step", ".0f")]
    print(common.markdown_table(rows, columns))
    span = {k: f"{v[0]:.3f} (rounds {v[1]:.3f}-{v[2]:.3f})" for k, v in spreads.items()}
    print(f"\n(d)/(c) steps/s {span['cache_vs_plain_steps_per_s']}; (d)/(b) time {span['cache_vs_mmdet_ld_time']}; "
          f"(c)/(a) time {span['plain_vs_mmdet_plain_time']}; goals "
          + ", ".join(f"{k}: {v}" for k, v in goals["met"].items()))
    differences = []
    if profiles:
        differences = op_differences(profiles["ours_plain"], profiles["mmdet_gfl"], top=10)
        print(f"\n(c) against (a), operator by operator ({args.profile} profiled steps each; self time, ms per "
              "step; the largest differences):\n")
        print(common.markdown_table(differences, [("op", "operator", ""), ("ours_ms", "(c) ms", ".1f"),
                                                  ("theirs_ms", "(a) ms", ".1f"), ("diff_ms", "(c) - (a)", "+.1f"),
                                                  ("ours_calls", "(c) calls", ".0f"),
                                                  ("theirs_calls", "(a) calls", ".0f")]))
    common.write_results(args.out, args, rows, device, goals=goals, mmdet=versions, op_differences=differences)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
