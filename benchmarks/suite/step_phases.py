"""Where a student train step spends its time, phase by phase, for this checkout or another one.

    .venv/bin/python -m benchmarks.suite.step_phases                        # CPU: 640x640, batch 2, full width
    .venv/bin/python -m benchmarks.suite.step_phases --device cuda --img-scale 1344,800 --batch-size 8
    (cd /tmp/ldcache-before && .venv/bin/python -m benchmarks.suite.step_phases --label before)  # another checkout

The step is the engine's own train_step (distill.step) on vs_mmdetection's random batch (B noise
images, 7 GT boxes each, 80 classes) with a full-width R-18 student, for two variants: plain (no
teacher) and cache (the full recipe from fixed fp16 teacher rows, decoded on the device at every
step as the cache's teacher source does; the reads themselves are benchmarked apart). Phases are
timed from outside the code, by wrapping the functions train_step and compute_losses call (the
student's forward, ATSS assign_batch, gfl_losses, distillation_losses, the teacher rows, backward,
the optimizer step), so the same script measures any version of the code that has these names
(run it in that checkout; --label names it). "rest" is the step's time outside
the wrapped phases (row flattening, the loss read-out, Python). On CUDA each phase is synchronised
before and after, which costs some overlap; on the CPU nothing changes. Variants alternate for
--rounds rounds; the table gives the median over rounds of ms per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import detector
import distill.criterion as criterion
import distill.step as step_module
from benchmarks.harness import common
from benchmarks.harness.batches import random_batch
from detector.config import ModelConfig
from detector.model import build_detector
from detector.rows import TeacherRows, flatten_rows
from distill.config import LossConfig

SCRIPT = "step_phases"
PHASES = ("teacher rows", "forward", "assignment", "gfl_losses", "distillation", "backward", "optimizer")
VARIANTS = ("plain", "cache")


class PhaseClock:
    """Wall time per phase, accumulated by the wrappers below (outermost phase only)."""

    def __init__(self, device: torch.device):
        self.device, self.ms, self.depth = device, defaultdict(float), 0

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            if self.depth:  # a phase inside another is counted by the outer one
                return fn(*args, **kwargs)
            self.depth += 1
            common.sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                common.sync(self.device)
                self.ms[phase] += 1000 * (time.perf_counter() - start)
                self.depth -= 1
        return timed


class FixedRows:
    """The teacher source of a cache without its reads: fp16 rows decoded on the device each step."""

    def __init__(self, box, cls):
        self.box, self.cls = box, cls

    def rows(self, batch, stored, device):
        return TeacherRows(self.box.to(device).float(), self.cls.to(device).float())


class Timed(torch.nn.Module):
    """The student with its forward timed as one phase."""

    def __init__(self, model: torch.nn.Module, clock: PhaseClock):
        super().__init__()
        self.model, self.clock = model, clock

    def forward(self, images):
        return self.clock.wrap("forward", self.model)(images)


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--label", default="this checkout", help="the name of the measured code in the table and JSON")
    p.add_argument("--img-scale", default="640,640", help="W,H of the batch's images")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="JSON result (default benchmarks/results/step_phases-LABEL.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    w, h = common.parse_pair(args.img_scale)
    student_cfg = ModelConfig(depth=18, num_classes=80)  # mmdetection's GFL widths, stem + stage 1 frozen
    batch, _ = random_batch(args.batch_size, h, w, student_cfg.strides)
    torch.manual_seed(1)
    teacher = build_detector(ModelConfig(depth=101, num_classes=80)).to(device).eval()
    with torch.no_grad():
        cls_maps, box_maps = teacher(batch.images.to(device))
    level_hw = [r.level_hw for r in batch.records]
    fixed = FixedRows(flatten_rows(box_maps, level_hw).half().cpu(), flatten_rows(cls_maps, level_hw).half().cpu())
    del teacher
    clock = PhaseClock(device)
    # The functions train_step and compute_losses call, wrapped where they are looked up.
    criterion.assign_batch = clock.wrap("assignment", criterion.assign_batch)
    criterion.gfl_losses = clock.wrap("gfl_losses", criterion.gfl_losses)
    criterion.distillation_losses = clock.wrap("distillation", criterion.distillation_losses)
    fixed.rows = clock.wrap("teacher rows", fixed.rows)
    torch.Tensor.backward = clock.wrap("backward", torch.Tensor.backward)
    learners = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = build_detector(student_cfg).to(device).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        optimizer.step = clock.wrap("optimizer", optimizer.step)
        learners[variant] = step_module.Learner(
            Timed(model, clock),
            optimizer,
            torch.amp.GradScaler("cuda", enabled=False),
            criterion.build_criterion(LossConfig(), student_cfg),
            device,
            "bf16" if args.amp else "off",
            fixed if variant == "cache" else None,
        )
    runs = {v: [] for v in VARIANTS}
    for rnd in range(args.rounds):
        for variant in VARIANTS:
            for i in range(args.warmup):
                step_module.train_step(learners[variant], (batch, None), 1e-4, i)
            clock.ms.clear()
            common.sync(device)
            start = time.perf_counter()
            for i in range(args.steps):
                step_module.train_step(learners[variant], (batch, None), 1e-4, args.warmup + i)
            common.sync(device)
            total = 1000 * (time.perf_counter() - start) / args.steps
            phases = {p: clock.ms.get(p, 0.0) / args.steps for p in PHASES}
            runs[variant].append({"step": total, **phases, "rest": total - sum(phases.values())})
            print(f"[{rnd}] {variant:6s} {total:8.1f} ms/step", file=sys.stderr, flush=True)
    keys = ("step", *PHASES, "rest")
    medians = {v: {k: common.median([r[k] for r in runs[v]]) for k in keys} for v in VARIANTS}
    rows = [{"phase": k, **{v: medians[v][k] for v in VARIANTS},
             "cache - plain": medians["cache"][k] - medians["plain"][k]} for k in keys]
    env = common.environment(device)
    print(f"\n{args.label} ({Path(detector.__file__).resolve().parents[1]}); {env['device_name']}; "
          f"{args.batch_size} x {w}x{h}, R-18 student (full width, 80 classes), {args.threads} threads, amp "
          f"{'bf16' if args.amp else 'off'}; median of {args.rounds} rounds of {args.steps} steps, ms per step\n")
    print(common.markdown_table(rows, [("phase", "phase", ""), ("plain", "plain", ".1f"), ("cache", "cache", ".1f"),
                                       ("cache - plain", "cache - plain", "+.1f")]))
    print(f"\ncache / plain steps/s: {medians['plain']['step'] / medians['cache']['step']:.3f}")
    out = args.out or str(common.RESULTS_DIR / f"{SCRIPT}-{args.label.replace(' ', '-')}.json")
    common.write_results(out, args, rows, device, runs=runs, code=str(Path(detector.__file__).resolve().parents[1]))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
