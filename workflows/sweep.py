"""Student sweeps over one teacher cache: the use the product exists for.

Every grid point is one train-student run in its own folder under the sweep folder, started as a
separate process (so --jobs N runs N at once) with --resume. The caller gives the command line of
train-student (the CLI knows how it was started; nothing here names it); a point adds its
--out, --resume and its grid values: a finished point (eval.json present)
is skipped, a killed one continues from its last checkpoint. The teacher never runs; every point
reads the same cache. Results: sweep.json, sweep.md and sweep.png beside the runs."""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import Field, dataclass, fields
from pathlib import Path

from core.config import domain_of, param, validate_fields
from core.domains import Flag, Range, Text, Texts
from core.errors import UserError
from core.paths import OutputPath
from core.runtime import DeviceList
from data.config import DataConfig
from detector.config import ModelConfig
from distill.config import LossConfig, TrainConfig
from workflows.plots import plot_sweep

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class GridAxis(Text):
    """One --grid axis, name=v1,v2,...: a train-student option and values in its domain."""

    def __init__(self):
        super().__init__("name=v1,v2,... of a train-student option, each value one it allows", metavar="NAME=V1,V2")

    def check(self, value) -> str | None:
        if not isinstance(value, str):
            return f"must be {self.allowed}, got {value!r}"
        try:
            parse_axis(value)
        except UserError as err:
            return str(err).removeprefix("--grid ")
        return None


@dataclass(frozen=True)
class SweepConfig:
    cache: str = param(None, "the teacher cache every point reads (folder or fsspec URL)",
                       Text("a teacher cache folder or fsspec URL"), shown="required")
    grid: tuple[str, ...] = param((), "name=v1,v2,... of a train-student option (name=v1;v2 when a value holds "
                                          "commas: lr_steps=8,11;10,14); repeat for a cartesian product",
                                  Texts(GridAxis()), shown="required")
    out: str = param("runs/sweep", "sweep folder: one run per point, sweep.md, sweep.json, sweep.png",
                     OutputPath("dir"))
    jobs: int = param(1, "points trained at once on the CPU (each a process); with --devices: one per device group",
                      Range(1, 256))
    devices: str = param("", "GPUs to spread the points over: 0,1,2,3 or auto (every visible GPU); each point sees "
                             "only its own (CUDA_VISIBLE_DEVICES)", DeviceList(), shown="none: the CPU")
    gpus_per_job: int = param(1, "with --devices: GPUs per point, run as a torchrun of that many processes",
                              Range(1, 64))

    def __post_init__(self):
        validate_fields(self, "sweep configuration")  # every grid value is checked (GridAxis)
        if not self.cache:
            raise UserError("--cache is required: the teacher cache every point reads")
        if self.grid:
            parse_grid(list(self.grid))  # and the axes together (no name twice)

    def device_slots(self) -> list[tuple[str, ...]] | None:
        """Groups of gpus_per_job devices, one point each at a time (None: the CPU)."""
        if not self.devices:
            return None
        if self.devices == "auto":
            import torch

            names = [str(i) for i in range(torch.cuda.device_count())]
            if not names:
                return None  # no GPU visible: the CPU, as without --devices
        else:
            names = [d.strip() for d in self.devices.split(",") if d.strip()]
        k = self.gpus_per_job
        if len(names) < k:
            raise UserError(f"--gpus-per-job {k} needs at least {k} devices, got --devices {self.devices}")
        return [tuple(names[i:i + k]) for i in range(0, len(names) - k + 1, k)]


def sweepable_fields() -> dict[str, Field]:
    """The config fields a grid may vary (everything a train-student flag sets, except paths and
    what does not change the result), by name."""
    out = {f.name: f for cls in (LossConfig, TrainConfig, ModelConfig) for f in fields(cls) if f.metadata["flag"]}
    out.update({f.name: f for f in fields(DataConfig) if f.name in ("views", "img_scale")})
    for name in ("device", "workers", "log_every", "checkpoint_every", "backbone_weights"):
        out.pop(name)
    return out


def parse_axis(item: str) -> list[tuple[str, str]]:
    """"ld_temperature=5,10" -> [("ld_temperature", "5"), ("ld_temperature", "10")], each value
    checked against its option's domain, so a typo fails the sweep before it starts."""
    allowed = sweepable_fields()
    key, sep, values = item.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not values.strip():
        raise UserError(f"--grid {item!r} must look like name=v1,v2,... (e.g. ld_temperature=5,10,15)")
    if key not in allowed:
        raise UserError(f"--grid {key} is not a train-student option; choose from {', '.join(sorted(allowed))}")
    # Values are separated by commas, or by semicolons when a value holds commas itself
    # (lr_steps=8,11;10,14, views=orig;orig,hflip); an img_scale may also be given as 1333x800.
    axis = [(key, v.strip().replace("x", ",") if key == "img_scale" else v.strip())
            for v in values.split(";" if ";" in values else ",") if v.strip()]
    unique: dict = {}  # a value given twice (0.25,0.25 or 0.25,.25) is one point, not two runs of one folder
    for _, text in axis:
        problem = grid_value_problem(allowed[key], text)
        if problem:
            raise UserError(f"--grid {key}={text}: {problem}")
        unique.setdefault(repr(domain_of(allowed[key]).parse(text)), (key, text))
    return list(unique.values())


def parse_grid(items: list[str]) -> list[dict[str, str]]:
    """["ld_temperature=5,10", "vlr_gamma=0,0.25"] -> the cartesian product as override dicts."""
    axes = [parse_axis(item) for item in items]
    if not axes:
        raise UserError("give at least one --grid name=v1,v2,...")
    keys = [axis[0][0] for axis in axes]
    if len(set(keys)) != len(keys):
        raise UserError(f"--grid names repeat: {keys}")
    return [dict(point) for point in itertools.product(*axes)]


def grid_value_problem(f: Field, text: str) -> str | None:
    try:
        value = domain_of(f).parse(text)
    except ValueError as err:
        return str(err)
    return domain_of(f).check(value)


def option_args(name: str, text: str) -> list[str]:
    """The train-student arguments that set option `name` to the grid value `text`: an on/off
    option is the flag itself (--weight-sum-clamp / --no-weight-sum-clamp), anything else takes
    the value."""
    flag = name.replace("_", "-")
    if isinstance(domain_of(sweepable_fields()[name]), Flag):
        return [f"--{flag}" if Flag().parse(text) else f"--no-{flag}"]
    return [f"--{flag}", text]


def point_name(overrides: dict[str, str]) -> str:
    return "__".join(f"{k}={v.replace(',', 'x')}" for k, v in overrides.items())


@dataclass
class PointResult:
    name: str
    overrides: dict
    status: str  # done, skipped (finished before), failed
    metrics: dict | None
    train_seconds: float | None
    run_dir: str


def point_command(train_student: list[str], overrides: dict, run_dir: Path, slot: tuple[str, ...] | None,
                  threads: int) -> tuple[list[str], dict]:
    """(argv, environment) of one point: on a device slot it sees only those GPUs, and runs as a
    torchrun of one process per GPU when the slot holds several."""
    cmd = [*train_student, "--out", str(run_dir), "--resume"]
    for key, value in overrides.items():
        cmd += option_args(key, value)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
        cmd += ["--device", "cuda"]
        if len(slot) > 1:  # train_student[0] is the Python that runs the CLI
            cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(len(slot)), *cmd[1:]]
    return cmd, env


POINT_RECORD = "sweep_point.json"  # the train-student options a finished point ran with


def _point_options(cmd: list[str]) -> list[str]:
    """What a point trains with: its train-student options (not the Python or torchrun that ran them)."""
    return cmd[cmd.index("train-student") + 1:] if "train-student" in cmd else cmd


def _run_point(cmd: list[str], env: dict, overrides: dict, run_dir: Path) -> PointResult:
    """A point finished with these options is skipped; one finished with others is resumed, so
    train-student continues it (a larger --max-iters), evaluates it again, or refuses the options."""
    eval_file, record = run_dir / "eval.json", run_dir / POINT_RECORD
    name = run_dir.name
    finished_with = json.loads(record.read_text())["options"] if record.exists() else None
    if eval_file.exists() and finished_with in (None, _point_options(cmd)):  # None: a sweep that kept no record
        ev = json.loads(eval_file.read_text())
        return PointResult(name, overrides, "skipped", ev["metrics"], ev.get("train_seconds"), str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "log.txt").open("a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not eval_file.exists():
        return PointResult(name, overrides, "failed", None, None, str(run_dir))
    record.write_text(json.dumps({"options": _point_options(cmd)}) + "\n")
    ev = json.loads(eval_file.read_text())
    return PointResult(name, overrides, "done", ev["metrics"], ev.get("train_seconds"), str(run_dir))


def run_sweep(cache: str, grid: list[dict[str, str]], train_student: list[str], out: Path, jobs: int = 1,
              on_result=None, slots: list[tuple[str, ...]] | None = None, on_progress=None) -> list[PointResult]:
    """train_student: the argv that trains a student from `cache` with the sweep's shared options
    (e.g. [python, cli.py, "train-student", "--cache", STORE, "--epochs", "6"]). slots: device
    groups (SweepConfig.device_slots), one point each at a time; None: `jobs` points on the CPU."""
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    out.mkdir(parents=True, exist_ok=True)
    free: queue.Queue = queue.Queue()
    for slot in slots or [None] * jobs:
        free.put(slot)
    parallel = free.qsize()
    threads = max(1, (os.cpu_count() or 1) // parallel)
    if on_progress:
        where = f"on device group(s) {', '.join('+'.join(s) for s in slots)}" if slots else f"{jobs} at a time"
        on_progress(f"sweep of {len(grid)} students over {cache} -> {out} ({where})")
    results: list[PointResult | None] = [None] * len(grid)
    progress = _Progress(len(grid), on_progress)

    def one(i: int) -> None:
        slot = free.get()
        try:
            run_dir = out / point_name(grid[i])
            progress.started()
            results[i] = _run_point(*point_command(train_student, grid[i], run_dir, slot, threads), grid[i], run_dir)
            progress.finished(results[i].status != "skipped")
        finally:
            free.put(slot)
        if on_result:
            on_result(results[i])

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(one, range(len(grid))))
    write_report(out, cache, train_student, results)
    return results


class _Progress:
    """The sweep-wide line: points done / running / left, and an ETA from the points trained so far."""

    def __init__(self, total: int, echo):
        self.total, self.echo, self.lock = total, echo, threading.Lock()
        self.done = self.running = self.trained = 0
        self.start = time.perf_counter()

    def started(self) -> None:
        with self.lock:
            self.running += 1

    def finished(self, trained: bool) -> None:
        with self.lock:
            self.running, self.done, self.trained = self.running - 1, self.done + 1, self.trained + trained
            left = self.total - self.done - self.running
            eta = ""
            if self.trained:  # the sweep's pace so far (with its parallelism) over what is not done
                pace = (time.perf_counter() - self.start) / self.trained
                eta = f", ETA {_clock(pace * (left + self.running))}"
            if self.echo:
                self.echo(f"sweep: {self.done}/{self.total} done, {self.running} running, {left} left{eta}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def write_report(out: Path, cache: str, command: list[str], results: list[PointResult]) -> None:
    rows = [r.__dict__ for r in results]
    (out / "sweep.json").write_text(json.dumps({"cache": cache, "command": command, "points": rows}, indent=2) + "\n")
    keys = list(results[0].overrides) if results else []
    header = keys + list(METRICS[:3]) + ["train s", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(results, key=lambda r: -(r.metrics or {}).get("AP", -1)):
        m = r.metrics or {}
        cells = [r.overrides[k] for k in keys] + [f"{100 * m[k]:.1f}" if k in m else "-" for k in METRICS[:3]]
        cells += [f"{r.train_seconds:.0f}" if r.train_seconds else "-", r.status]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    if any(r.metrics for r in results):
        plot_sweep(results, out / "sweep.png")
