"""Run every benchmark and gather their results into benchmarks/results/SUMMARY.md.

    .venv/bin/python -m benchmarks.run_all                       # CPU size, about an hour on 2 cores
    .venv/bin/python -m benchmarks.run_all --teacher runs/synth/teacher.pt   # fidelity on a trained teacher
    .venv/bin/python -m benchmarks.run_all --gpu                 # COCO-like size on a CUDA GPU

Each script prints its own table and writes benchmarks/results/<name>.json; this driver runs them
one after another (never in parallel: they would measure each other) and writes a markdown
summary with the tables, the machine and the exact commands (`--only NAME...` reruns some and
keeps the others' latest sections). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRIPT_OF = {"sparse_size_coco_like": "sparse_size"}  # result names run by another name's script


def _relative(part: str) -> str:
    """A path inside the repository as the repository-relative path the README's commands use."""
    try:
        return str(Path(part).relative_to(HERE.parent))
    except ValueError:
        return part


def script_command(name: str) -> list[str]:
    """How run_all starts benchmark `name`: as a module, from the repository root."""
    return [sys.executable, "-m", f"benchmarks.suite.{name}"]


def plan(args) -> list[tuple[str, list[str]]]:
    teacher = ["--teacher", args.teacher] if args.teacher else []
    if args.gpu:
        gpu = ["--device", "cuda", "--img-scale", "1344,800", "--threads", "0"]
        return [
            ("dump_throughput", [*gpu, "--num-images", "128", "--batch-size", "8", "--workers", "8", "--depth", "101",
                                 "--base-width", "64", "--fpn-channels", "256", "--head-channels", "256",
                                 "--stacked-convs", "4", "--box-dtypes", "float16,uint8"]),
            ("train_throughput", ["--device", "cuda", "--amp", "bf16", "--img-scale", "1344,800", "--student-depth",
                                  "18", "--teacher-depth", "101", "--full-width", "--batch-size", "8", "--workers",
                                  "8", "--num-images", "64", "--steps", "40", "--warmup", "5", "--rounds", "3",
                                  "--profile"]),
            ("vs_mmdetection", ["--device", "cuda", "--amp", "--img-scale", "1344,800", "--batch-size", "8",
                                "--threads", "8", "--steps", "20", "--warmup", "5", "--rounds", "3", "--mmdet-python",
                                args.mmdet_python]),
            ("step_phases", ["--device", "cuda", "--amp", "--img-scale", "1344,800", "--batch-size", "8", "--threads",
                             "8", "--steps", "10", "--warmup", "3", "--label", "gpu"]),
            ("coco_geometry", ["--device", "cuda", "--num-images", "64", "--batch-size", "8", "--workers", "8"]),
        ]
    cpu = ["--threads", "0"]  # every core: run_all is meant for an idle machine
    return [
        ("dump_throughput", [*cpu, *teacher]),
        ("cache_size_fidelity", [*cpu, *teacher]),
        ("read_throughput", [*cpu, *teacher]),
        ("train_throughput", [*cpu, *teacher]),
        ("sparse_size", []),
        ("sparse_size_coco_like", ["--coco-like", "2000"]),  # sparse_size.py: an estimate from COCO's statistics
        ("ld_density", []),  # positives and VLR weight per image, synthetic vs COCO-like (ld_defaults.py: hours, apart)
        ("scaleout", [*cpu, *teacher]),
        ("vs_mmdetection", ["--threads", "2", "--rounds", "5", "--mmdet-python", args.mmdet_python]),  # 640x640, b 2
        ("step_phases", ["--label", "cpu"]),  # where a 640x640 step's time goes, plain and from the cache
        ("deploy_latency", []),  # students as deployed: eager, TorchScript, ONNX Runtime at 320 and 640 px
        ("coco_geometry", []),  # 64 views at 1333,800 with a full-width R-101: the longest (~30 min)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="a trained teacher checkpoint (fidelity depends on real logits)")
    parser.add_argument("--gpu", action="store_true", help="COCO-like sizes on CUDA instead of the CPU set")
    parser.add_argument("--only", nargs="*", help="run only these scripts")
    parser.add_argument("--mmdet-python", default="/tmp/mmdet_venv/bin/python",
                        help="the mmdetection venv's Python for vs_mmdetection (skipped when missing; build it with "
                             "bash ../shared/tools/mmdet_oracle/make_venv.sh /tmp/mmdet_venv)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help="where the JSON, sections and summary go (default: benchmarks/results)")
    args = parser.parse_args()
    results = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    suffix = "-gpu" if args.gpu else ""
    failed = []
    for name, extra in plan(args):
        if args.only and name not in args.only:
            continue
        out = results / f"{name}{suffix}.json"
        if name == "vs_mmdetection" and not Path(args.mmdet_python).exists():
            print(f"== {name}: skipped, no mmdetection venv at {args.mmdet_python}", flush=True)
            continue
        script = SCRIPT_OF.get(name, name)
        cmd = [*script_command(script), *extra, "--out", str(out)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        # progress (stderr) shows as it comes; the table (stdout) is echoed and kept for the summary,
        # so a run stopped from outside still shows how far it got
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        table = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            table.append(line)
        returncode = proc.wait()
        seconds = time.perf_counter() - start
        if returncode != 0:
            failed.append(name)
            section = f"## {name}\n\nFAILED (exit {returncode}); see the command below.\n\n`{' '.join(cmd[1:])}`\n"
        else:
            env = json.loads(out.read_text()).get("environment", {})
            shown = " ".join(_relative(c) for c in cmd[1:])
            section = (f"## {name}\n\n{''.join(table).strip()}\n\n"
                       f"- device: {env.get('device_name', '?')}; torch {env.get('torch', '?')}; {seconds:.0f} s\n"
                       f"- command: `.venv/bin/python {shown}`\n")
        (results / f"{name}{suffix}.section.md").write_text(section)
    # The summary holds the latest section of every script, so `--only` refreshes a part of it.
    sections = [path.read_text() for path in (results / f"{name}{suffix}.section.md" for name, _ in plan(args))
                if path.exists()]
    summary = results / f"SUMMARY{suffix}.md"
    summary.write_text("# Benchmark results\n\nWritten by `python -m benchmarks.run_all`"
                       f"{' --gpu' if args.gpu else ''}.\n\n" + "\n".join(sections))
    print(f"wrote {summary}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
