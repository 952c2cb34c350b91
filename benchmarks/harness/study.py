"""What the training studies share (studies/ld_defaults.py, studies/distill_methods.py): the small
datasets, the teacher and student recipes, their options, the progress log, and reading finished runs."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from benchmarks.harness import common
from benchmarks.harness.command_queue import Job
from benchmarks.harness.ledger import Ledger

CONFIGS = common.REPO_ROOT / "configs"
TEACHER, STUDENT = CONFIGS / "synthetic-teacher.toml", CONFIGS / "synthetic-student.toml"
SIZE = ["--num-train", "500", "--num-val", "150", "--image-size", "160"]
DATASETS = {  # name -> make-synthetic options
    "synth": [],
    "dense1": ["--num-classes", "1", "--min-objects", "15", "--max-objects", "40", "--min-object-px", "6",
               "--max-object-frac", "0.15"],
    "large8": ["--num-classes", "8", "--min-objects", "1", "--max-objects", "3", "--min-object-px", "30",
               "--max-object-frac", "0.9"],
    "tiny6": ["--num-classes", "6", "--min-objects", "10", "--max-objects", "25", "--min-object-px", "6",
              "--max-object-frac", "0.15", "--seed", "6"],
}
# The demo's teacher (R-34 half width, 96-channel 3-conv head) and schedules; model and schedule
# flags only, never a loss weight.
TEACHER_FLAGS = ["--config", str(TEACHER), "--epochs", "30", "--fpn-channels", "96", "--head-channels", "96",
                 "--stacked-convs", "3", "--warmup-iters", "50", "--workers", "1"]
STUDENT_FLAGS = ["--config", str(STUDENT), "--epochs", "16", "--warmup-iters", "50", "--workers", "1"]
SPARSE_U8 = ["--store-regions", "main+vlr", "--min-vlr-gamma", "0.25", "--box-dtype", "uint8"]


def teacher_jobs(work: Path, name: str, make_flags: list[str], caches: dict[str, list[str]]):
    """One dataset's shared jobs: make it, train its teacher, dump each cache (name -> dump flags)
    into WORK/NAME/CACHE.zarr. -> (jobs, the data flags every run of it takes). Studies that plan
    the same names in one work folder share these runs (a finished run is never redone)."""
    root, d = work / name, work / "data" / name
    data = ["--images", str(d / "train"), "--ann", str(d / "annotations" / "instances_train.json"),
            "--val-images", str(d / "val"), "--val-ann", str(d / "annotations" / "instances_val.json"),
            "--img-scale", "160,160"]
    teacher = root / "teacher"
    jobs = [Job(f"{name}/data", ["make-synthetic", str(d), *SIZE, *make_flags], d),
            Job(f"{name}/teacher", ["train-detector", *TEACHER_FLAGS, *data, "--out", str(teacher)], teacher,
                (f"{name}/data",))]
    for cache, flags in caches.items():
        jobs.append(Job(f"{name}/{cache}", ["dump-teacher", "--teacher", str(teacher / "checkpoints" / "last.pt"),
                                            *data[:4], *flags, "--out", str(root / f"{cache}.zarr")],
                        root / f"{cache}.zarr", (f"{name}/teacher",)))
    return jobs, data


def study_args(description: str, name: str, datasets: dict) -> argparse.ArgumentParser:
    """The options every training study takes (more are added by each)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", default=str(common.REPO_ROOT / "runs" / name))
    p.add_argument("--parallel", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, help="threads per run (default: cores / parallel)")
    p.add_argument("--datasets", default=",".join(datasets), help="which of " + ", ".join(datasets))
    p.add_argument("--only", help="a regular expression: run only the matching runs (and what they wait on)")
    p.add_argument("--report-only", action="store_true",
                   help="no run: record what finished since the queue stopped, and write the report")
    p.add_argument("--out", default=str(common.RESULTS_DIR / f"{name}.json"))
    return p


def chosen_datasets(p: argparse.ArgumentParser, args, datasets: dict) -> list[str]:
    chosen = args.datasets.split(",")
    unknown = sorted(set(chosen) - set(datasets))
    if unknown:
        p.error(f"unknown dataset(s) {', '.join(unknown)}: choose from {', '.join(datasets)}")
    return chosen


@contextlib.contextmanager
def progress_log(work: Path):
    """A log function that prints a timestamped line and appends it to WORK/progress.log."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "progress.log", "a") as log_file:
        def log(message: str) -> None:
            line = f"{time.strftime('%H:%M:%S')} {message}"
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()
        yield log


def ap(work: Path, run_name: str, key: str = "AP") -> float | None:
    """A finished run's COCO metric in percent (None: not finished)."""
    return Ledger(None, work).ap(run_name, key)


def seed_stats(work: Path, run_pattern: str, seeds: int) -> dict:
    """The APs of the finished runs run_pattern.format(seed) for seeds 0..seeds-1, their mean and sd."""
    return Ledger(None, work).seed_stats(run_pattern, seeds)


def seed_diffs(runs: Ledger, pattern: str, baseline: str, seeds: int) -> list[float | None]:
    """pattern's AP minus baseline's, seed by seed (None where either has not finished)."""
    pairs = [(runs.ap(pattern.format(s)), runs.ap(baseline.format(s))) for s in range(seeds)]
    return [None if None in pair else pair[0] - pair[1] for pair in pairs]


# How the studies' tables print a number, a seed cell (mean +- sd (seeds)), a share and per-seed differences.
def one(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def mean_sd(cell: dict, star: str = "") -> str:
    if cell["mean"] is None:
        return "-"
    spread = "" if cell["sd"] is None else f" +- {cell['sd']:.1f}"
    return f"{cell['mean']:.1f}{star}{spread} ({len(cell['aps'])})"


def gap_share(teacher: float | None, plain: float | None, value: float | None) -> float | None:
    """The share of the teacher-plain AP gap that value closes (None: a number is missing, or no gap)."""
    return (value - plain) / (teacher - plain) if None not in (teacher, plain, value) and teacher > plain else None


def percent(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def by_seed(diffs: list[float | None]) -> str:
    return "/".join("-" if d is None else f"{d:+.1f}" for d in diffs)


def parse_study(doc: str, name: str, datasets: dict, seeds: int) -> tuple[argparse.Namespace, Path, list[str]]:
    """The options of a study over datasets and seeds, parsed: (args, work folder, chosen datasets)."""
    p = study_args(doc.split("\n\n")[0], name, datasets)
    p.add_argument("--seeds", type=int, default=seeds)
    args = p.parse_args()
    return args, Path(args.workdir), chosen_datasets(p, args, datasets)


def finish_report(out: dict, jobs: list[Job], text: list[str]) -> dict:
    """A study's report, completed with the command of every run and the table's text."""
    out["commands"] = {j.name: "ldcache " + " ".join(j.argv) for j in jobs}
    out["table"] = "\n".join(text)
    return out


def publish(args, result: dict) -> None:
    """Print the study's table and write its JSON (args.out) with every run's command."""
    print(result["table"])
    common.write_results(args.out, args, [], common.resolve_device("cpu"), **result)
    print(f"\nwrote {args.out}", file=sys.stderr)
