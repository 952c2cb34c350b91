"""Student steps side by side with mmdetection's own, in one run, on the same random batch.

    bash ../shared/tools/mmdet_oracle/make_venv.sh /tmp/mmdet_venv       # once: mmdetection 3.3.0 on CPU
    .venv/bin/python benchmarks/vs_mmdetection.py                           # CPU: 640x640, batch 2, 2 threads
    .venv/bin/python benchmarks/vs_mmdetection.py --device cuda --amp --img-scale 1344,800 --batch-size 8

Five steps, each model.loss/our train_step + backward + SGD on B images of --img-scale with ~7 GT
boxes each (80 classes), full-width models with random weights, the same threads on both sides:
  (a) mmdet GFL R-18                    mmdetection's gfl_r50_fpn_1x_coco with depth 18
  (b) mmdet LD R-18 <- R-101 online     its ld_r18-gflv1-r101_fpn_1x_coco (Main LD, teacher every step)
  (c) ours, plain R-18                  distill.step.train_step, no teacher
  (d) ours, R-18 from cached rows       the full recipe (Main LD + VLR LD + Main KD) from fp16 rows of
                                        the teacher (computed once, decoded on the device every step
                                        as from a cache; the cache's own reads are benchmarked apart)
  (e) ours, R-18 <- R-101 online        the full recipe with our teacher run every step
mmdetection runs in its own venv (benchmarks/mmdet_side.py, driven over a pipe); the variants
alternate a, b, c, d, e (reversed every other round) for --rounds rounds; the table gives the median ms per step over rounds, and each ratio
is the median over rounds of the ratio within a round (variants of a round run back to back).
Goals: (d) >= 0.95 x (c) in steps/s; (d) at most half of (b)'s time; (c) no slower than (a).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402

from cache_teacher.reader import TeacherCache  # noqa: E402
from detector.coco import Batch  # noqa: E402
from detector.config import ModelConfig  # noqa: E402
from detector.model import build_detector  # noqa: E402
from detector.rows import TeacherRows, flatten_rows  # noqa: E402
from detector.views import ViewRecord, level_sizes  # noqa: E402
from distill.config import LossConfig  # noqa: E402
from distill.step import Learner, train_step  # noqa: E402
from distill.teachers import OnlineTeacher  # noqa: E402

SCRIPT = "vs_mmdetection"
VARIANTS = ("mmdet_gfl", "mmdet_ld", "ours_plain", "ours_cache", "ours_online")
LABELS = {"mmdet_gfl": "(a) mmdet GFL R-18", "mmdet_ld": "(b) mmdet LD R-18 <- R-101 online",
          "ours_plain": "(c) ours plain R-18", "ours_cache": "(d) ours R-18 from cached rows",
          "ours_online": "(e) ours R-18 <- R-101 online"}


class CachedRows:
    """A teacher source serving fixed fp16 rows, decoded on the device each step (the cache's path
    without its reads)."""

    def __init__(self, stored: dict):
        self.stored = stored

    def rows(self, batch, stored, device) -> TeacherRows:
        box, cls, _ = TeacherCache.decode(self.stored, device)
        return TeacherRows(box, cls)


def random_batch(b: int, h: int, w: int, strides) -> tuple[Batch, dict]:
    """B normalised noise images with 7 random GT boxes each (80 classes), as mmdet_side reads them."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, h, w, generator=g)
    boxes, labels = [], []
    for _ in range(b):
        xy = torch.rand(7, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(7, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, 80, (7,), generator=g))
    records = [ViewRecord(i, False, (max(h, w), min(h, w)), (h, w), (h, w), (h, w), level_sizes((h, w), strides))
               for i in range(b)]
    return Batch(images, boxes, labels, records, list(range(b))), {"images": images, "boxes": boxes, "labels": labels}


class Ours:
    def __init__(self, batch: Batch, device: torch.device, amp: str):
        self.batch, self.device, self.amp = batch, device, amp
        self.student_cfg = ModelConfig(depth=18, num_classes=80)  # mmdet's GFL widths, stem + stage 1 frozen
        torch.manual_seed(1)
        teacher = build_detector(ModelConfig(depth=101, num_classes=80)).to(device).eval()
        with torch.no_grad():
            cls_maps, box_maps = teacher(batch.images.to(device))
        level_hw = [r.level_hw for r in batch.records]
        stored = {"box": flatten_rows(box_maps, level_hw).half().cpu().numpy(),
                  "cls": flatten_rows(cls_maps, level_hw).half().cpu().numpy()}
        self.teachers = {"ours_plain": None, "ours_cache": CachedRows(stored),
                         "ours_online": OnlineTeacher(teacher, teacher.config, "random", amp=amp)}
        self.learners = {}

    def build(self, variant: str) -> None:
        torch.manual_seed(0)
        model = build_detector(self.student_cfg).to(self.device).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.learners[variant] = Learner(model, optimizer, scaler, self.student_cfg, LossConfig(), self.device,
                                         self.amp, self.teachers[variant])

    def time(self, variant: str, steps: int, warmup: int) -> list[float]:
        learner, times = self.learners[variant], []
        for i in range(warmup + steps):
            common.sync(self.device)
            start = time.perf_counter()
            train_step(learner, (self.batch, None), 1e-4, i)  # its one read-out synchronises
            common.sync(self.device)
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - start))
        return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mmdet-python", default=os.environ.get("MMDET_PYTHON", "/tmp/mmdet_venv/bin/python"),
                   help="the Python of the mmdetection venv (../shared/tools/mmdet_oracle/make_venv.sh)")
    p.add_argument("--img-scale", type=common.parse_pair, default=(640, 640), help="W,H of the batch's images")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same on both sides")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on both sides (CUDA)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(common.RESULTS_DIR / f"{SCRIPT}.json"))
    args = p.parse_args()
    if not Path(args.mmdet_python).exists():
        sys.exit(f"error: no mmdetection venv at {args.mmdet_python}; build it with "
                 "bash ../shared/tools/mmdet_oracle/make_venv.sh /tmp/mmdet_venv (or pass --mmdet-python)")
    torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    w, h = args.img_scale
    batch, saved = random_batch(args.batch_size, h, w, ModelConfig().strides)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(saved, Path(tmp) / "batch.pt")
        side = subprocess.Popen([args.mmdet_python, str(Path(__file__).with_name("mmdet_side.py")), "--batch",
                                 str(Path(tmp) / "batch.pt"), "--threads", str(args.threads), "--device", args.device,
                                 *(["--amp"] if args.amp else [])],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def ask(command: dict) -> dict:
            side.stdin.write(json.dumps(command) + "\n")
            side.stdin.flush()
            line = side.stdout.readline()
            if not line:
                sys.exit("error: the mmdetection side stopped; run benchmarks/mmdet_side.py by hand to see why")
            return json.loads(line)

        versions = [ask({"build": name}) for name in ("gfl", "ld")]
        ours = Ours(batch, device, "bf16" if args.amp else "off")
        for variant in VARIANTS[2:]:
            ours.build(variant)
        runs = {v: [] for v in VARIANTS}
        for rnd in range(args.rounds):
            for variant in VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]:  # no variant always first or last
                if variant.startswith("mmdet"):
                    times = ask({"time": variant.split("_")[1], "steps": args.steps, "warmup": args.warmup})["ms_per_step"]
                else:
                    times = ours.time(variant, args.steps, args.warmup)
                runs[variant].append(statistics.median(times))
                print(f"[{rnd}] {LABELS[variant]:36s} {runs[variant][-1]:9.1f} ms/step", file=sys.stderr, flush=True)
        side.stdin.close()
        side.wait()
    ms = {v: statistics.median(r) for v, r in runs.items()}

    def ratio(a: str, b: str) -> tuple[float, float, float]:
        """Median, min and max over rounds of a / b, each round's two variants run back to back."""
        r = [x / y for x, y in zip(runs[a], runs[b])]
        return statistics.median(r), min(r), max(r)

    rows = [{"variant": LABELS[v], "ms_per_step": ms[v], "steps_per_s": 1000 / ms[v],
             "x_mmdet_plain": ratio(v, "mmdet_gfl")[0], "rounds_ms": runs[v]} for v in VARIANTS]
    spreads = {"cache_vs_plain_steps_per_s": ratio("ours_plain", "ours_cache"),
               "cache_vs_mmdet_ld_time": ratio("ours_cache", "mmdet_ld"),
               "plain_vs_mmdet_plain_time": ratio("ours_plain", "mmdet_gfl")}
    goals = {k: v[0] for k, v in spreads.items()}
    goals["range_over_rounds"] = {k: v[1:] for k, v in spreads.items()}
    goals["met"] = {"(d)/(c) >= 0.95 in steps/s": goals["cache_vs_plain_steps_per_s"] >= 0.95,
                    "(d) <= 0.5 x (b)": goals["cache_vs_mmdet_ld_time"] <= 0.5,
                    "(c) <= (a)": goals["plain_vs_mmdet_plain_time"] <= 1.0}
    env = common.environment(device)
    print(f"\n{env['device_name']}; {args.batch_size} x {w}x{h}, {args.threads} threads a side, amp "
          f"{'bf16' if args.amp else 'off'}; {versions[0]['mmdet']} mmdetection, torch {versions[0]['torch']}; "
          f"median of {args.rounds} alternating rounds of {args.steps} steps; ratios: median over rounds of the "
          "ratio within a round\n")
    print(common.markdown_table(rows, [("variant", "step", ""), ("ms_per_step", "ms/step", ".0f"),
                                       ("steps_per_s", "steps/s", ".3f"), ("x_mmdet_plain", "x (a)", ".2f")]))
    span = {k: f"{v[0]:.3f} (rounds {v[1]:.3f}-{v[2]:.3f})" for k, v in spreads.items()}
    print(f"\n(d)/(c) steps/s {span['cache_vs_plain_steps_per_s']}; (d)/(b) time {span['cache_vs_mmdet_ld_time']}; "
          f"(c)/(a) time {span['plain_vs_mmdet_plain_time']}; goals "
          + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals["met"].items()))
    common.write_results(args.out, args, rows, device, goals=goals, mmdet=versions)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
