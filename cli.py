"""ldcache command line: with cli_options.py (how options are made), the only module that parses
arguments and prints for humans.

Commands only declare their options and map them onto config dataclasses: every config field
(declared once, with its default, help and domain, via core.config.param) becomes the
kebab-case flag of its name, parsed and checked by its domain (core.domains). A command's own
options are declared the same way (Opt). Options resolve as dataclass defaults < the command's
--config TOML tables (checked when read) < flags actually typed; the resolved configuration is
saved beside every output. Every command runs on the embedded synthetic dataset when no data is
given. Bad input, a malformed flag included, ends with one line on stderr and exit code 2 before
anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from cache_teacher.dump_config import DumpConfig
from cache_teacher.inspect import InspectConfig
from cli_options import Group, Opt, UsageError, command
from core.config import build_config, read_toml_tables
from core.domains import Flag, JsonObject, Range, Text
from core.errors import UserError, one_line
from core.paths import InputDir, InputFile, OutputPath
from data.config import DataConfig
from data.synthetic import SyntheticConfig
from detector.config import ARCH_FIELDS, ModelConfig
from detector.inference import EvalConfig
from distill.config import LossConfig, TrainConfig
from workflows.demo import DemoConfig
from workflows.export import ExportConfig
from workflows.predict import ImageInput, PredictConfig
from workflows.sweep import SweepConfig

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Localization Distillation with the teacher run once: dump its logits, train students from them.")
THIS = Path(__file__).resolve()  # sweeps start train-student the way this command was started


def say(message: str, err: bool = False) -> None:
    """Print for humans once: under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(message, err=err)


# ---- the commands ------------------------------------------------------------------------------
SYNTHETIC = (Group("synthetic", SyntheticConfig),)
TRAIN = (Group("data", DataConfig), Group("model", ModelConfig), Group("train", TrainConfig))
# The data a command reads, one config for all (data/config.py): each command shows the fields it uses.
DUMP_DATA = Group("data", DataConfig, only=("images", "ann", "img_scale", "views", "extra_scales"))
EVALUATE_DATA = Group("data", DataConfig, only=("images", "ann", "img_scale"))
INSPECT_DATA = Group("data", DataConfig, only=("images", "ann"))
TASK_LOSSES = ("qfl_weight", "giou_weight", "dfl_weight")
DETECTOR = (*TRAIN, Group("loss", LossConfig, only=TASK_LOSSES))
STUDENT = (*TRAIN, Group("loss", LossConfig))
ARCH = Group("model", ModelConfig, only=ARCH_FIELDS, shown="the checkpoint's")
EVALUATE, DUMP = (Group("evaluate", EvalConfig), EVALUATE_DATA, ARCH), (Group("dump", DumpConfig), DUMP_DATA, ARCH)
DEMO, SWEEP = (Group("demo", DemoConfig),), (Group("sweep", SweepConfig),)
INSPECT = (Group("inspect", InspectConfig), INSPECT_DATA)
PREDICT, EXPORT = (Group("predict", PredictConfig), ARCH), (Group("export", ExportConfig), ARCH)
Out = Annotated[Path, Opt(OutputPath("dir"), "run folder: config.json, metrics.jsonl, checkpoints/, eval.json")]
Resume = Annotated[bool, Opt(Flag(), "continue the run in --out from its last checkpoint")]
STORE = Text("a cache folder or fsspec URL", metavar="STORE")


@command(app, "make-synthetic", *SYNTHETIC)
def make_synthetic_cmd(out: Annotated[Path, Opt(OutputPath("dir"), "folder to create (train/, val/, annotations/)",
                                                positional=True)],
                       overwrite: Annotated[bool, Opt(Flag(), "replace a non-empty OUT")] = False, *, fields, config):
    """Write a seeded synthetic COCO-format detection dataset (no download needed)."""
    from data.synthetic import make_synthetic

    cfg = build_config(SyntheticConfig, fields["synthetic"], "synthetic")
    path = make_synthetic(out, **dataclasses.asdict(cfg), overwrite=overwrite, workers=2)
    typer.echo(f"wrote {cfg.num_train} train and {cfg.num_val} val images with annotations to {path}")


def _train(fields: dict, out: Path, resume: bool, teacher=None, what: str = "GFL") -> None:
    from workflows.train import run_training

    try:
        result = run_training(fields, Path(out), resume, teacher, what, echo=say)
    except KeyboardInterrupt:
        last = Path(out) / "checkpoints" / "last.pt"
        say(f"interrupted: progress saved in {last}; continue with --resume" if last.is_file()
            else "interrupted before the first checkpoint: nothing to resume; run the command again", err=True)
        raise typer.Exit(130)
    say(f"done: {result['iter']} steps in {result['train_seconds']:.0f} s; checkpoint {out}/checkpoints/last.pt")


@command(app, "train-detector", *DETECTOR)
def train_detector_cmd(out: Out = Path("runs/detector"), resume: Resume = False, *, fields, config):
    """Train a GFL detector without distillation (teachers and baselines)."""
    _train(fields, out, resume)


@command(app, "train-student", *STUDENT, ignored_tables=("sweep",))
def train_student_cmd(
    cache: Annotated[str | None, Opt(STORE, "teacher cache from dump-teacher (folder or fsspec URL)")] = None,
    teacher: Annotated[str | None, Opt(InputFile("checkpoint file"),
                                       "instead of --cache: run this teacher online on every batch")] = None,
    teacher_gn_groups: Annotated[int | None, Opt(Range(1, 2048), "GroupNorm groups of an mmdet --teacher "
                                                                 "[default: 32]")] = None,
    storage_options: Annotated[dict | None, Opt(JsonObject(), "JSON of fsspec storage options for a cache URL")] = None,
    out: Out = Path("runs/student"), resume: Resume = False, *, fields, config,
):
    """Train a GFL student with the full LD recipe from a teacher cache (or an online teacher)."""
    from workflows.student import teacher_source

    source = teacher_source(cache, teacher, storage_options, {"gn_groups": teacher_gn_groups} if teacher_gn_groups
                            else {}, fields["train"].get("amp", "auto"))
    _train(fields, out, resume, teacher=source, what="student")


@command(app, "evaluate", *EVALUATE)
def evaluate_cmd(*, fields, config):
    """COCO AP of a checkpoint on a dataset, printed as a table and saved as JSON."""
    from detector.evaluation import format_metrics_table
    from detector.inference import run_evaluate

    result = run_evaluate(build_config(EvalConfig, {**fields["evaluate"], "arch": fields["model"],
                                                    "data": build_config(DataConfig, fields["data"], "data")},
                                       "evaluate"))
    if result["metrics"] is not None:  # rank 0 (or the only process)
        typer.echo(format_metrics_table(result["metrics"]))
        typer.echo(f"{result['detections']} detections on {result['images']} images -> {result['out']}; "
                   f"metrics -> {result['metrics_path']}")


@command(app, "predict", *PREDICT)
def predict_cmd(checkpoint: Annotated[str, Opt(InputFile("checkpoint or exported file"), "our or an mmdetection GFL "
                                               "checkpoint, or a file from ldcache export", positional=True)],
                inputs: Annotated[list[str], Opt(ImageInput(), "image files or folders (searched recursively)",
                                                 positional=True)], *, fields, config):
    """Detections on image files and folders: OUT/detections.json (COCO results with file and class names),
    OUT/images.json, and with --draw one picture per image."""
    from workflows.predict import run_predict

    result = run_predict(checkpoint, inputs, build_config(PredictConfig, {**fields["predict"], "arch": fields["model"]},
                                                          "predict"))
    for note in result["notes"]:
        typer.echo(note, err=True)
    typer.echo(f"{result['detections']} detections on {result['images']} images -> {result['out']}/detections.json")
    if result["skipped"]:
        typer.echo(f"skipped {len(result['skipped'])} unreadable image(s), listed in {result['out']}/skipped.txt: "
                   + ", ".join(str(path) for path, _ in result["skipped"]))


@command(app, "export", *EXPORT)
def export_cmd(checkpoint: Annotated[str, Opt(InputFile("checkpoint file"), "our or an mmdetection GFL checkpoint",
                                              positional=True)], *, fields, config):
    """One ONNX or TorchScript file with decoding and NMS inside (boxes, scores, labels [N, K]), and FILE.json
    beside it with the input transform, the classes and the thresholds."""
    from workflows.export import run_export

    result = run_export(checkpoint, build_config(ExportConfig, {**fields["export"], "arch": fields["model"]}, "export"))
    typer.echo(f"wrote {result['out']} ({result['format']}; max difference from the PyTorch model on a test batch "
               f"{result['max_diff']:.2g}) and {result['sidecar']}")


@command(app, "dump-teacher", *DUMP)
def dump_teacher_cmd(*, fields, config):
    """Run the teacher once over every view of the dataset and write its logits to a Zarr v3 cache."""
    from cache_teacher.dump import format_dump_result, run_dump

    cfg = build_config(DumpConfig, {**fields["dump"], "arch": fields["model"],
                                    "data": build_config(DataConfig, fields["data"], "data")}, "dump")
    say(format_dump_result(run_dump(cfg), cfg.out))


@command(app, "inspect-cache", *INSPECT)
def inspect_cache_cmd(store: Annotated[str, Opt(STORE, "cache folder or fsspec URL", positional=True)], *, fields,
                      config):
    """What a cache holds, whether it is whole and faithful (--verify), and a picture (--png)."""
    from cache_teacher.inspect import run_inspect

    report, text = run_inspect(store, build_config(InspectConfig,
                                                   {**fields["inspect"],
                                                    "data": build_config(DataConfig, fields["data"], "data")},
                                                   "inspect"))
    typer.echo(text)
    if "verify" in report and not report["verify"]["ok"]:
        raise typer.Exit(1)


@command(app, "demo", *DEMO)
def demo_cmd(*, fields, config):
    """The whole product on the synthetic data: teacher, dump, inspect, plain, LD and BCKD students, one table."""
    from workflows.demo import run_demo

    cfg = build_config(DemoConfig, fields["demo"], "demo")
    report = run_demo(Path(cfg.workdir), quick=cfg.quick, device=cfg.device, workers=cfg.workers, echo=typer.echo)
    typer.echo("")
    typer.echo(report["table"])


@command(app, "sweep", *SWEEP, ignored_tables=("model", "data", "train", "loss"),
         context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep_cmd(ctx: typer.Context, *, fields, config):
    """Train one student per grid point from ONE cache; re-running skips finished points and resumes
    killed ones. Further options (e.g. --config recipe.toml --epochs 6) go to every train-student run;
    a [sweep] table in that --config sets the options above."""
    from cache_teacher.reader import CacheReader
    from workflows.sweep import parse_grid, point_name, run_sweep

    args = list(ctx.args) + (["--config", str(config)] if config else [])  # the recipe goes to every point too
    cfg = build_config(SweepConfig, fields["sweep"], "sweep")
    points = parse_grid(list(cfg.grid))
    # Every point's options are parsed (and checked) now, not once per point; so is the cache.
    student_ctx = typer.main.get_command(app).commands["train-student"].make_context(
        "ldcache train-student", ["--cache", cfg.cache, *args])
    read_toml_tables(config, {g.table: g.cls for g in STUDENT}, ("sweep",))
    CacheReader(cfg.cache, student_ctx.params.get("storage_options")).require_complete()

    def report(r):
        ap = f"AP {100 * r.metrics['AP']:.1f}" if r.metrics else f"see {r.run_dir}/log.txt"
        typer.echo(f"  {r.status:8s} {point_name(r.overrides)}: {ap}")

    train_student = [sys.executable, str(THIS), "train-student", "--cache", cfg.cache, *args]
    results = run_sweep(cfg.cache, points, train_student, Path(cfg.out), cfg.jobs, on_result=report,
                        slots=cfg.device_slots(), on_progress=typer.echo)
    typer.echo((Path(cfg.out) / "sweep.md").read_text())
    failed = [r for r in results if r.status == "failed"]
    if failed:
        typer.echo(f"{len(failed)} point(s) failed; their logs are in {failed[0].run_dir}/log.txt and beside it",
                   err=True)
        raise typer.Exit(1)


@command(app, "plot")
def plot_cmd(
    runs: Annotated[list[str], Opt(InputDir("run folder"), "run folders (train-detector / train-student --out)",
                                   positional=True)],
    out: Annotated[Path, Opt(OutputPath("file"), "PNG to write")] = Path("runs/curves.png"),
    smooth: Annotated[int, Opt(Range(1, 1_000_000), "moving mean over this many metrics records")] = 10,
    *, fields, config,
):
    """Loss, distillation-term and AP curves of runs from their metrics.jsonl, as one PNG."""
    from workflows.plots import plot_runs

    typer.echo(f"wrote {plot_runs([Path(r) for r in runs], Path(out), smooth)}")


def main(argv: list[str] | None = None) -> None:
    """The console script: runs one command and exits 0, or 2 with one line for bad input (a
    UserError or a flag its parser refused); anything else is a bug and keeps its traceback."""
    from core.distributed import shutdown

    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as err:
        say(f"error: {one_line(err)}", err=True)
        code = 2
    except UsageError as err:
        ctx = getattr(err, "ctx", None)
        # "Invalid value for '--depth': must be ..." -> "--depth must be ...": the flag, what it allows, the value.
        message = re.sub(r"^Invalid value for '([^']+)': ", r"\1 ", " ".join(err.format_message().split()))
        if message:  # empty: the help was printed (ldcache with no command)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            say(f"error: {message}{hint}", err=True)
        code = err.exit_code
    except typer.Abort:
        code = 1
    finally:
        shutdown()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
