"""ldcache command line: the only module that parses arguments and prints for humans.

Commands only declare their options and map them onto config dataclasses: every config field
(declared once, with its default and help, via detector.config.param) becomes the kebab-case flag
of its name. Options resolve as dataclass defaults < the command's --config TOML tables < flags
actually typed; the resolved configuration is saved beside every output. Every command runs on
the embedded synthetic dataset when no data is given. Bad input ends with one line on stderr and
exit code 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cache_teacher.dump_config import DumpConfig
from cache_teacher.inspect import InspectConfig
from detector.config import ARCH_FIELDS, ModelConfig, build_config, parsed_value, read_toml_tables
from detector.errors import UserError, one_line
from detector.inference import EvalConfig
from detector.synthetic import SyntheticConfig
from distill.config import DataConfig, LossConfig, TrainConfig
from workflows.demo import DemoConfig
from workflows.sweep import SweepConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Localization Distillation with the teacher run once: dump its logits, train students from them.")
TYPED = ("COMMANDLINE", "ENVIRONMENT")  # parameter sources of values the user gave (typer vendors click)
THIS = Path(__file__).resolve()  # sweeps start train-student the way this command was started


# ---- options generated from config fields --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Group:
    """The fields of one config class a command exposes, and the TOML table that sets them."""

    table: str
    cls: type
    only: tuple[str, ...] | None = None
    shown: str | None = None  # one default note for every field (e.g. "the checkpoint's")

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls) if f.metadata.get("flag", True)
                and (self.only is None or f.name in self.only)]


def _cli_type(f: dataclasses.Field, hint):
    if f.metadata.get("parse"):
        return str
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return list[str]
    return hint


def _option(f: dataclasses.Field, hint, shown: str | None) -> inspect.Parameter:
    """The flag of a field. A plain default is the option's default (so --help prints it); a
    field whose default needs words ("the dataset's") prints those. Either way only values
    actually typed are used (click's parameter source), so TOML tables can set the rest."""
    flag = f.name.replace("_", "-")
    kind = _cli_type(f, hint)
    default = f.default if f.default is not dataclasses.MISSING else None
    note = shown or f.metadata.get("shown")
    decls = (f"--{flag}/--no-{flag}",) if kind is bool else (f"--{flag}",)
    help_text = escape(f.metadata.get("help", ""))
    if note is None and default is not None:
        option = typer.Option(*decls, help=help_text, show_default=True)
    else:
        option, default = typer.Option(*decls, help=help_text, show_default=escape(note) if note else False), None
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[Optional[kind], option])


def command(name: str, *groups: Group, ignored_tables: tuple[str, ...] = (), **settings):
    """Register fn as command `name` with its own parameters, --config and one option per field of
    the groups. fn receives fields={table: the TOML table's values overridden by the flags typed}
    and config (the TOML path, or None); ignored_tables are another command's, skipped."""
    tables = ", ".join(f"[{g.table}]" for g in groups)
    config_param = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option("--config", help=escape(
            f"TOML file with {'the ' + tables + ' table' if len(groups) == 1 else tables + ' tables'}; typed flags win"))])

    def wrap(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in ("fields", "config")]
        generated = {}
        for g in groups:
            hints = typing.get_type_hints(g.cls)
            for f in g.fields():
                generated[f.name] = (g.table, f, _option(f, hints[f.name], g.shown))

        def run(**kw):
            ctx = kw.pop("click_context")
            if any(p.name == "ctx" for p in own):
                kw["ctx"] = ctx
            typed = {g.table: {} for g in groups}
            for name_, (table, f, _) in generated.items():
                value = kw.pop(name_, None)
                source = ctx.get_parameter_source(name_)
                if source is not None and source.name in TYPED and value is not None:
                    typed[table][name_] = parsed_value(f, value)
            config = kw.pop("config")
            from_file = read_toml_tables(config, {g.table: g.cls for g in groups}, ignored_tables)
            fields = {t: {**from_file.get(t, {}), **values} for t, values in typed.items()}
            return fn(**kw, fields=fields, config=config)

        context = inspect.Parameter("click_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        own_params = [p for p in own if p.name != "ctx"]
        run.__signature__ = inspect.Signature([*own_params, context, config_param,
                                               *(param for _, _, param in generated.values())])
        run.__doc__, run.__name__ = escape(fn.__doc__ or ""), fn.__name__
        app.command(name, **settings)(run)
        return fn
    return wrap


def say(message: str, err: bool = False) -> None:
    """Print for humans once: under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(message, err=err)


# ---- the commands ------------------------------------------------------------------------------
SYNTHETIC = (Group("synthetic", SyntheticConfig),)
TRAIN = (Group("data", DataConfig), Group("model", ModelConfig), Group("train", TrainConfig))
TASK_LOSSES = ("qfl_weight", "giou_weight", "dfl_weight")
DETECTOR = (*TRAIN, Group("loss", LossConfig, only=TASK_LOSSES))
STUDENT = (*TRAIN, Group("loss", LossConfig))
ARCH = Group("model", ModelConfig, only=ARCH_FIELDS, shown="the checkpoint's")
EVALUATE, DUMP = (Group("evaluate", EvalConfig), ARCH), (Group("dump", DumpConfig), ARCH)
DEMO, SWEEP = (Group("demo", DemoConfig),), (Group("sweep", SweepConfig),)
INSPECT = (Group("inspect", InspectConfig),)
Out = Annotated[Path, typer.Option(help="run folder: config.json, metrics.jsonl, checkpoints/, eval.json")]
Resume = Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")]


@command("make-synthetic", *SYNTHETIC)
def make_synthetic_cmd(out: Annotated[Path, typer.Argument(help="folder to create (train/, val/, annotations/)")],
                       overwrite: Annotated[bool, typer.Option(help="replace a non-empty OUT")] = False,
                       *, fields, config):
    """Write a seeded synthetic COCO-format detection dataset (no download needed)."""
    from detector.synthetic import make_synthetic

    cfg = build_config(SyntheticConfig, fields["synthetic"], "synthetic")
    path = make_synthetic(out, **dataclasses.asdict(cfg), overwrite=overwrite, workers=2)
    typer.echo(f"wrote {cfg.num_train} train and {cfg.num_val} val images with annotations to {path}")


def _train(fields: dict, out: Path, resume: bool, teacher=None, what: str = "GFL") -> None:
    from detector.config import GFL_STRIDES
    from distill.config import resolve_data
    from distill.engine import build_train_dataset, run_train

    data = resolve_data(fields["data"])
    dataset = build_train_dataset(data, GFL_STRIDES)
    model_cfg = build_config(ModelConfig, {"num_classes": dataset.num_classes, **fields["model"]}, "model")
    train_cfg = build_config(TrainConfig, fields["train"], "train")
    loss_cfg = build_config(LossConfig, fields["loss"], "loss")
    say(f"training {what} R-{model_cfg.depth} ({model_cfg.num_classes} classes) on {data.ann} ({len(dataset)} images) -> {out}")
    try:
        result = run_train(data, model_cfg, train_cfg, loss_cfg, out, resume=resume, dataset=dataset, teacher=teacher)
    except KeyboardInterrupt:
        say(f"interrupted: progress saved in {out}/checkpoints/last.pt; continue with --resume", err=True)
        raise typer.Exit(130)
    say(f"done: {result['iter']} steps in {result['train_seconds']:.0f} s; checkpoint {out}/checkpoints/last.pt")


@command("train-detector", *DETECTOR)
def train_detector_cmd(out: Out = Path("runs/detector"), resume: Resume = False, *, fields, config):
    """Train a GFL detector without distillation (teachers and baselines)."""
    _train(fields, out, resume)


@command("train-student", *STUDENT, ignored_tables=("sweep",))
def train_student_cmd(
    cache: Annotated[Optional[str], typer.Option(help="teacher cache from dump-teacher (folder or fsspec URL)")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="instead of --cache: run this teacher online on every batch")] = None,
    teacher_gn_groups: Annotated[Optional[int], typer.Option(help="GroupNorm groups of an mmdet --teacher",
                                                             show_default="32")] = None,
    storage_options: Annotated[Optional[str], typer.Option(help="JSON of fsspec storage options for a cache URL")] = None,
    out: Out = Path("runs/student"), resume: Resume = False, *, fields, config,
):
    """Train a GFL student with the full LD recipe from a teacher cache (or an online teacher)."""
    from cache_teacher.reader import parse_storage_options
    from workflows.student import data_defaults, teacher_source

    source = teacher_source(cache, str(teacher) if teacher else None, parse_storage_options(storage_options),
                            {"gn_groups": teacher_gn_groups} if teacher_gn_groups else {},
                            fields["train"].get("device", "auto"), fields["train"].get("amp", "auto"))
    fields["data"] = {**data_defaults(source, fields["data"]), **fields["data"]}
    _train(fields, out, resume, teacher=source, what="LD student")


@command("evaluate", *EVALUATE)
def evaluate_cmd(*, fields, config):
    """COCO AP of a checkpoint on a dataset, printed as a table and saved as JSON."""
    from detector.evaluation import format_metrics_table
    from detector.inference import run_evaluate

    result = run_evaluate(build_config(EvalConfig, {**fields["evaluate"], "arch": fields["model"]}, "evaluate"))
    if result["metrics"] is not None:  # rank 0 (or the only process)
        typer.echo(format_metrics_table(result["metrics"]))
        typer.echo(f"{result['detections']} detections on {result['images']} images -> {result['out']}; metrics -> {result['metrics_path']}")  # noqa: E501


@command("dump-teacher", *DUMP)
def dump_teacher_cmd(*, fields, config):
    """Run the teacher once over every view of the dataset and write its logits to a Zarr v3 cache."""
    from cache_teacher.dump import format_dump_result, run_dump

    cfg = build_config(DumpConfig, {**fields["dump"], "arch": fields["model"]}, "dump")
    say(format_dump_result(run_dump(cfg), cfg.out))


@command("inspect-cache", *INSPECT)
def inspect_cache_cmd(store: Annotated[str, typer.Argument(help="cache folder or fsspec URL")], *, fields, config):
    """What a cache holds, whether it is whole and faithful (--verify), and a picture (--png)."""
    from cache_teacher.inspect import run_inspect

    report, text = run_inspect(store, build_config(InspectConfig, fields["inspect"], "inspect"))
    typer.echo(text)
    if "verify" in report and not report["verify"]["ok"]:
        raise typer.Exit(1)


@command("demo", *DEMO)
def demo_cmd(*, fields, config):
    """The whole product on the synthetic data: teacher, dump, inspect, plain and LD students, one table."""
    from workflows.demo import run_demo

    cfg = build_config(DemoConfig, fields["demo"], "demo")
    report = run_demo(Path(cfg.workdir), quick=cfg.quick, device=cfg.device, workers=cfg.workers, echo=typer.echo)
    typer.echo("")
    typer.echo(report["table"])


@command("sweep", *SWEEP, ignored_tables=("model", "data", "train", "loss"),
         context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep_cmd(ctx: typer.Context, *, fields, config):
    """Train one student per grid point from ONE cache; re-running skips finished points and resumes
    killed ones. Further options (e.g. --config recipe.toml --epochs 6) go to every train-student run;
    a [sweep] table in that --config sets the options above."""
    from cache_teacher.reader import TeacherCache, parse_storage_options
    from workflows.sweep import parse_grid, point_name, run_sweep

    args = list(ctx.args) + (["--config", str(config)] if config else [])  # the recipe goes to every point too
    cfg = build_config(SweepConfig, fields["sweep"], "sweep")
    points = parse_grid(list(cfg.grid))
    options = args[args.index("--storage-options") + 1] if "--storage-options" in args[:-1] else None
    TeacherCache(cfg.cache, parse_storage_options(options)).require_complete()  # fail now, not once per point

    def report(r):
        ap = f"AP {100 * r.metrics['AP']:.1f}" if r.metrics else f"see {r.run_dir}/log.txt"
        typer.echo(f"  {r.status:8s} {point_name(r.overrides)}: {ap}")

    train_student = [sys.executable, str(THIS), "train-student", "--cache", cfg.cache, *args]
    results = run_sweep(cfg.cache, points, train_student, Path(cfg.out), cfg.jobs, on_result=report,
                        slots=cfg.device_slots(), on_progress=typer.echo)
    typer.echo((Path(cfg.out) / "sweep.md").read_text())
    failed = [r for r in results if r.status == "failed"]
    if failed:
        typer.echo(f"{len(failed)} point(s) failed; their logs are in {failed[0].run_dir}/log.txt and beside it", err=True)
        raise typer.Exit(1)


@app.command("plot")
def plot_cmd(
    runs: Annotated[list[Path], typer.Argument(help="run folders (train-detector / train-student --out)")],
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("runs/curves.png"),
    smooth: Annotated[int, typer.Option(help="moving mean over this many metrics records")] = 10,
):
    """Loss, distillation-term and AP curves of runs from their metrics.jsonl, as one PNG."""
    from workflows.plots import plot_runs

    typer.echo(f"wrote {plot_runs(runs, out, smooth)}")


def main() -> None:
    from detector.distributed import shutdown

    try:
        app()
    except UserError as err:
        say(f"error: {one_line(err)}", err=True)
        sys.exit(2)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
