"""mmdetection's GFL R-18 network against ours in ONE process: forward, and forward + backward of a
plain sum-of-squares loss on the raw head outputs, alternating rounds; no assignment, losses or
optimizer. Run with the mmdetection oracle venv's Python (../shared/tools/mmdet_oracle/make_venv.sh):
it imports this checkout's detector package (pure torch) beside mmdetection.

    /tmp/mmdet_venv/bin/python -m benchmarks.studies.mmdet_network                 # 2 x 640x640, 2 threads
    /tmp/mmdet_venv/bin/python -m benchmarks.studies.mmdet_network --profile       # + top operators of each side

vs_mmdetection.py times whole train steps, each variant in a process of its own (ours in this venv,
mmdetection's in its own); this script tells whether a difference there is in the network itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.harness import step_worker
from detector.config import ModelConfig
from detector.model import build_detector

HERE = Path(__file__).resolve().parent


def _median_ms(fn, steps: int) -> float:
    """Median ms of `steps` calls after one warm-up (step_worker's timing, on the CPU)."""
    return statistics.median(step_worker.time_steps(fn, steps, 1, torch.device("cpu"))["ms_per_step"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-scale", default="640,640", help="W,H")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print each side's top operators by self CPU time")
    p.add_argument("--out", default=str(HERE / "results" / "mmdet_network.json"))
    args = p.parse_args()
    import logging

    import mmdet
    from mmdet.utils import register_all_modules
    from mmengine.logging import MMLogger

    from benchmarks.harness import mmdet_side

    register_all_modules()
    MMLogger.get_current_instance().setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.img_scale.split(","))
    images = torch.randn(args.batch_size, 3, h, w, generator=torch.Generator().manual_seed(0))
    theirs, _ = mmdet_side.build("gfl", torch.device("cpu"))  # mmdetection's GFL config at depth 18
    torch.manual_seed(0)
    ours = build_detector(ModelConfig(depth=18, num_classes=80)).train()

    def outputs(name: str) -> list[torch.Tensor]:
        if name == "mmdetection":
            cls, reg = theirs.bbox_head(theirs.extract_feat(images))
        else:
            cls, reg = ours(images)
        return [*cls, *reg]

    def forward(name: str) -> None:
        with torch.no_grad():
            outputs(name)

    def forward_backward(name: str) -> None:
        sum((o.float() ** 2).mean() for o in outputs(name)).backward()

    sides = ("mmdetection", "ours")
    count = {s: (sum(q.numel() for q in m.parameters()), sum(q.numel() for q in m.parameters() if q.requires_grad))
             for s, m in zip(sides, (theirs, ours))}
    ms = {(s, k): [] for s in sides for k in ("forward", "forward+backward")}
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            ms[side, "forward"].append(_median_ms(lambda: forward(side), args.steps))
            ms[side, "forward+backward"].append(_median_ms(lambda: forward_backward(side), args.steps))
    rows = []
    for kind in ("forward", "forward+backward"):
        ratios = [o / t for o, t in zip(ms["ours", kind], ms["mmdetection", kind])]
        rows.append({"pass": kind, "mmdetection_ms": statistics.median(ms["mmdetection", kind]),
                     "ours_ms": statistics.median(ms["ours", kind]), "ours_over_mmdetection": statistics.median(ratios),
                     "ratio_range": [min(ratios), max(ratios)], "rounds_ms": {s: ms[s, kind] for s in sides}})
    print(
        f"\n{platform.processor() or platform.machine()}, {args.threads} threads, {args.batch_size} x {w}x{h}, "
        f"GFL R-18, 80 classes; parameters (all / trainable): mmdetection {count['mmdetection']}, "
        f"ours {count['ours']}; "
        f"median of {args.rounds} alternating rounds of {args.steps} passes\n"
    )
    print("| pass | mmdetection ms | ours ms | ours / mmdetection (range over rounds) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['pass']} | {r['mmdetection_ms']:.0f} | {r['ours_ms']:.0f} | {r['ours_over_mmdetection']:.3f} "
              f"({r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f}) |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for side in sides:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                forward_backward(side)
            print(f"\n{side}: top operators of one forward + backward\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "script": Path(__file__).name, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "parameters": vars(args),
        "environment": {"torch": torch.__version__, "mmdet": mmdet.__version__, "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "parameter_counts": count, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
