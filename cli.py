"""ldcache command line: the only module that parses arguments and prints for humans.

Every command runs on the embedded synthetic dataset when no data is given. Options resolve as
dataclass defaults < an optional --config TOML file < flags actually typed; the resolved
configuration is saved beside every output. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer

from detector.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Localization Distillation with the teacher run once: dump its logits, train students from them.")

SYNTHETIC_IMG_SCALE = (256, 256)  # the synthetic images' own size: no pointless upscaling to 1333x800

# ---- option types shared by commands (kebab-case forms of the config field names) ---------------
Depth = Annotated[Optional[int], typer.Option(help="ResNet depth: 18, 34, 50 or 101 [default: 50, or the checkpoint's]")]
BaseWidth = Annotated[Optional[int], typer.Option(help="ResNet stem channels (64 = standard) [default: 64]")]
FpnChannels = Annotated[Optional[int], typer.Option(help="FPN output channels [default: 256]")]
HeadChannels = Annotated[Optional[int], typer.Option(help="GFL head tower channels [default: 256]")]
StackedConvs = Annotated[Optional[int], typer.Option(help="convs per head tower [default: 4]")]
GnGroups = Annotated[Optional[int], typer.Option(help="GroupNorm groups in the head [default: 32]")]
RegMax = Annotated[Optional[int], typer.Option(help="box distribution bins - 1 [default: 16]")]
NumClasses = Annotated[Optional[int], typer.Option(help="classes [default: the dataset's, or the checkpoint's]")]
FrozenStages = Annotated[Optional[int], typer.Option(help="ResNet stages without gradient (0 when training from scratch) [default: 1]")]
NormEval = Annotated[Optional[bool], typer.Option("--norm-eval/--no-norm-eval", help="keep backbone BatchNorm statistics frozen (pretrained backbones) [default: on]")]
Images = Annotated[Optional[Path], typer.Option(help="image folder [default: the synthetic dataset's]")]
Ann = Annotated[Optional[Path], typer.Option(help="COCO annotation json [default: the synthetic dataset's]")]
ImgScale = Annotated[Optional[str], typer.Option(help="keep-ratio resize target LONG,SHORT [default: 1333,800; 256,256 on the synthetic data]")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N [default: auto]")]
Workers = Annotated[Optional[int], typer.Option(help="DataLoader worker processes [default: 2]")]
StorageOptions = Annotated[Optional[str], typer.Option(help="JSON of fsspec storage options for a cache URL, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (credentials also come from the usual environment variables)")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="TOML file with [model], [data], [train] and [loss] tables; typed flags win")]


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--storage-options must be a JSON object ({err}); e.g. '{{\"anon\": false}}'") from None
    if not isinstance(options, dict):
        raise UserError("--storage-options must be a JSON object such as '{\"endpoint_url\": \"http://host:9000\"}'")
    return options


def _given(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def _parse_pair(text: str, name: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{name} must be two integers LONG,SHORT such as 1333,800, got {text!r}") from None
    return a, b


def _load_toml(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML ({err}); fix it") from None
    unknown = sorted(set(table) - {"model", "data", "train", "loss"})
    if unknown:
        raise UserError(f"config file {path} has unknown tables {unknown}; use [model], [data], [train], [loss]")
    return table


def _synthetic_split(split: str) -> tuple[Path, Path]:
    from detector.synthetic import ensure_synthetic_default

    root = ensure_synthetic_default()
    return root / split, root / "annotations" / f"instances_{split}.json"


def _resolve_data(images, ann, val_images, val_ann, img_scale, views, toml: dict):
    """DataConfig from flags > TOML > defaults; no data at all means the synthetic default."""
    from distill.config import DataConfig
    from detector.views import DEFAULT_IMG_SCALE

    fields = {**toml, **_given(images=images, ann=ann, val_images=val_images, val_ann=val_ann, views=views)}
    if img_scale is not None:
        fields["img_scale"] = _parse_pair(img_scale, "--img-scale")
    if ("images" in fields) != ("ann" in fields):
        raise UserError("give both --images and --ann (or neither, for the synthetic dataset)")
    if "images" not in fields:
        fields["images"], fields["ann"] = _synthetic_split("train")
        if "val_ann" not in fields:
            fields["val_images"], fields["val_ann"] = _synthetic_split("val")
        fields.setdefault("img_scale", SYNTHETIC_IMG_SCALE)
    fields.setdefault("img_scale", DEFAULT_IMG_SCALE)
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}
    return DataConfig(**fields)


@app.command("make-synthetic")
def make_synthetic_cmd(
    out: Annotated[Path, typer.Argument(help="folder to create (train/, val/, annotations/)")],
    num_train: Annotated[int, typer.Option(help="training images")] = 1000,
    num_val: Annotated[int, typer.Option(help="validation images")] = 200,
    image_size: Annotated[int, typer.Option(help="upper bound of an image's long side, px")] = 256,
    num_classes: Annotated[int, typer.Option(help="object classes")] = 6,
    seed: Annotated[int, typer.Option(help="random seed; same seed, same dataset")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty OUT")] = False,
):
    """Write a seeded synthetic COCO-format detection dataset (no download needed)."""
    from detector.synthetic import make_synthetic

    path = make_synthetic(out, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                          num_classes=num_classes, overwrite=overwrite, workers=2)
    typer.echo(f"wrote {num_train} train and {num_val} val images with annotations to {path}")


# ---- training options shared by train-detector and train-student --------------------------------
Out = Annotated[Path, typer.Option(help="run folder: config.json, metrics.jsonl, checkpoints/, eval.json")]
ValImages = Annotated[Optional[Path], typer.Option(help="validation images [default: synthetic val]")]
ValAnn = Annotated[Optional[Path], typer.Option(help="validation annotations, evaluated after training")]
Views = Annotated[Optional[str], typer.Option(help="views drawn per image each epoch [default: orig,hflip; a cache's own]")]
Epochs = Annotated[Optional[int], typer.Option(help="epochs [default: 12]")]
BatchSize = Annotated[Optional[int], typer.Option(help="images per step [default: 16]")]
Lr = Annotated[Optional[float], typer.Option(help="learning rate [default: 0.01 x batch / 16 for sgd, 1e-4 x batch / 16 for adamw]")]
Optimizer = Annotated[Optional[str], typer.Option(help="sgd (the paper's recipe) or adamw [default: sgd]")]
WeightDecay = Annotated[Optional[float], typer.Option(help="weight decay [default: 1e-4]")]
WarmupIters = Annotated[Optional[int], typer.Option(help="linear warm-up steps [default: 500]")]
LrSteps = Annotated[Optional[str], typer.Option(help="epochs after which lr x0.1, e.g. 8,11 [default: 8/12 and 11/12 of --epochs]")]
MaxIters = Annotated[Optional[int], typer.Option(help="stop after this many steps")]
Seed = Annotated[Optional[int], typer.Option(help="seed of the model init and the batches [default: 0]")]
Amp = Annotated[Optional[str], typer.Option(help="auto (bf16 on CUDA), off, bf16, fp16 [default: auto]")]
LogEvery = Annotated[Optional[int], typer.Option(help="steps per metrics.jsonl record [default: 10]")]
CheckpointEvery = Annotated[Optional[int], typer.Option(help="also checkpoint every N steps [default: each epoch only]")]
BackboneWeights = Annotated[Optional[Path], typer.Option(help="torchvision ResNet ImageNet weights (.pth) to start the backbone from (COCO recipes)")]
EvalEvery = Annotated[Optional[int], typer.Option(help="also evaluate every N epochs: AP curves in metrics.jsonl [default: at the end only]")]
Resume = Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")]
GroupBy = Annotated[Optional[str], typer.Option(help="batch images of one orientation (mmdet) or of one padded canvas (no padding: students see views exactly as the cached teacher did) [default: orientation]")]


def _train_and_model_fields(toml: dict, lr_steps: str | None, train_flags: dict, model_flags: dict):
    """TrainConfig and ModelConfig fields: the TOML tables overridden by the flags typed."""
    train = {**toml.get("train", {}), **_given(**train_flags)}
    if lr_steps is not None:
        train["lr_steps"] = tuple(int(s) for s in lr_steps.split(",") if s.strip())
    return train, {**toml.get("model", {}), **_given(**model_flags)}


def _run_training(data, model_fields: dict, train_fields: dict, loss_fields: dict, out: Path, resume: bool,
                  teacher=None, what: str = "GFL"):
    from detector.config import GFL_STRIDES, ModelConfig
    from distill.config import LossConfig, TrainConfig
    from distill.engine import build_train_dataset, run_train

    dataset = build_train_dataset(data, GFL_STRIDES)
    model_fields.setdefault("num_classes", dataset.num_classes)
    try:
        train_cfg = TrainConfig(**train_fields)
        model_cfg = ModelConfig(**model_fields)
        loss_cfg = LossConfig(**loss_fields)
    except TypeError as err:
        raise UserError(f"unknown option in the configuration ({err}); check the --config file") from None
    say(f"training {what} R-{model_cfg.depth} ({model_cfg.num_classes} classes) on {data.ann} -> {out}")
    try:
        result = run_train(data, model_cfg, train_cfg, loss_cfg, out, resume=resume, dataset=dataset, teacher=teacher)
    except KeyboardInterrupt:
        say(f"interrupted: progress saved in {out}/checkpoints/last.pt; continue with --resume", err=True)
        raise typer.Exit(130)
    say(f"done: {result['iter']} steps in {result['train_seconds']:.0f} s; checkpoint {out}/checkpoints/last.pt")


@app.command("train-detector")
def train_detector_cmd(
    out: Out = Path("runs/detector"),
    images: Images = None, ann: Ann = None, val_images: ValImages = None, val_ann: ValAnn = None,
    img_scale: ImgScale = None, views: Views = None,
    depth: Depth = None, base_width: BaseWidth = None, fpn_channels: FpnChannels = None,
    head_channels: HeadChannels = None, stacked_convs: StackedConvs = None, gn_groups: GnGroups = None,
    reg_max: RegMax = None, num_classes: NumClasses = None, frozen_stages: FrozenStages = None,
    norm_eval: NormEval = None,
    epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None, optimizer: Optimizer = None,
    weight_decay: WeightDecay = None, warmup_iters: WarmupIters = None, lr_steps: LrSteps = None,
    max_iters: MaxIters = None, seed: Seed = None, device: Device = None, workers: Workers = None, amp: Amp = None,
    log_every: LogEvery = None, checkpoint_every: CheckpointEvery = None, eval_every: EvalEvery = None,
    backbone_weights: BackboneWeights = None, group_by: GroupBy = None, resume: Resume = False,
    config: ConfigFile = None,
):
    """Train a GFL detector without distillation (teachers and baselines)."""
    toml = _load_toml(config)
    data = _resolve_data(images, ann, val_images, val_ann, img_scale, views, toml.get("data", {}))
    train_fields, model_fields = _train_and_model_fields(
        toml, lr_steps, dict(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                             warmup_iters=warmup_iters, max_iters=max_iters, seed=seed, device=device, workers=workers,
                             amp=amp, log_every=log_every, checkpoint_every=checkpoint_every, eval_every=eval_every,
                             backbone_weights=str(backbone_weights) if backbone_weights else None,
                             group_by=group_by),
        dict(depth=depth, base_width=base_width, fpn_channels=fpn_channels, head_channels=head_channels,
             stacked_convs=stacked_convs, gn_groups=gn_groups, reg_max=reg_max, num_classes=num_classes,
             frozen_stages=frozen_stages, norm_eval=norm_eval))
    _run_training(data, model_fields, train_fields, toml.get("loss", {}), out, resume)


def _views_of_cache(cache) -> tuple[str, tuple[int, int], tuple]:
    """A cache's view specs as (views, img_scale, extra_scales) options."""
    scales = list(dict.fromkeys(s.img_scale for s in cache.specs))
    kinds = list(dict.fromkeys("hflip" if s.flip else "orig" for s in cache.specs))
    return ",".join(kinds), scales[0], tuple(scales[1:])


@app.command("train-student")
def train_student_cmd(
    cache: Annotated[Optional[str], typer.Option(help="teacher cache from dump-teacher (folder or fsspec URL)")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="instead of --cache: run this teacher online on every batch")] = None,
    teacher_gn_groups: Annotated[Optional[int], typer.Option(help="GroupNorm groups of an mmdet --teacher [default: 32]")] = None,
    storage_options: StorageOptions = None,
    out: Out = Path("runs/student"),
    images: Images = None, ann: Ann = None, val_images: ValImages = None, val_ann: ValAnn = None,
    img_scale: ImgScale = None, views: Views = None,
    depth: Depth = None, base_width: BaseWidth = None, fpn_channels: FpnChannels = None,
    head_channels: HeadChannels = None, stacked_convs: StackedConvs = None, gn_groups: GnGroups = None,
    reg_max: RegMax = None, num_classes: NumClasses = None, frozen_stages: FrozenStages = None,
    norm_eval: NormEval = None,
    epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None, optimizer: Optimizer = None,
    weight_decay: WeightDecay = None, warmup_iters: WarmupIters = None, lr_steps: LrSteps = None,
    max_iters: MaxIters = None, seed: Seed = None, device: Device = None, workers: Workers = None, amp: Amp = None,
    log_every: LogEvery = None, checkpoint_every: CheckpointEvery = None, eval_every: EvalEvery = None,
    backbone_weights: BackboneWeights = None, group_by: GroupBy = None, resume: Resume = False,
    ld_weight: Annotated[Optional[float], typer.Option(help="Main LD weight [default: 0.25]")] = None,
    ld_temperature: Annotated[Optional[float], typer.Option(help="LD temperature [default: 10]")] = None,
    vlr_weight: Annotated[Optional[float], typer.Option(help="VLR LD weight [default: 0.25]")] = None,
    vlr_gamma: Annotated[Optional[float], typer.Option(help="VLR band: gamma x thr <= DIoU < thr [default: 0.25]")] = None,
    vlr_iou: Annotated[Optional[str], typer.Option(help="official (the authors' DIoU variant) or diou [default: official]")] = None,
    kd_weight: Annotated[Optional[float], typer.Option(help="Main KD weight [default: 10]")] = None,
    kd_temperature: Annotated[Optional[float], typer.Option(help="KD temperature [default: 2]")] = None,
    kd_mode: Annotated[Optional[str], typer.Option(help="softmax (paper) or sigmoid (per class; one-class data) [default: softmax]")] = None,
    dfl_weight: Annotated[Optional[float], typer.Option(help="DFL weight [default: 0.25]")] = None,
    ld_normalization: Annotated[Optional[str], typer.Option(help="official (paper; grows with images per process) or mean (batch-size invariant) [default: official]")] = None,
    config: ConfigFile = None,
):
    """Train a GFL student with the full LD recipe from a teacher cache (or an online teacher)."""
    from cache_teacher.reader import TeacherCache

    if (cache is None) == (teacher is None):
        raise UserError("give exactly one of --cache (a dump-teacher store) or --teacher (run the teacher online)")
    toml = _load_toml(config)
    data_toml = dict(toml.get("data", {}))
    source = None
    if cache is not None:
        source = TeacherCache(cache, storage_options=_storage_options(storage_options))
        if views is None and img_scale is None and "views" not in data_toml and "img_scale" not in data_toml:
            views_str, scale, extra = _views_of_cache(source)  # the student sees the cached views by default
            data_toml.update(views=views_str, img_scale=scale, extra_scales=extra)
        if images is None and ann is None and "images" not in data_toml:
            hint = source.meta.source
            if hint.get("ann") and Path(hint["ann"]).is_file() and Path(hint.get("images", "")).is_dir():
                images, ann = Path(hint["images"]), Path(hint["ann"])
                synthetic_train = _synthetic_split("train")[1] if "synthetic-v" in str(ann) else None
                if synthetic_train is not None and Path(ann).resolve() == synthetic_train.resolve() and val_ann is None:
                    val_images, val_ann = _synthetic_split("val")  # the synthetic default evaluates on its val split
    data = _resolve_data(images, ann, val_images, val_ann, img_scale, views, data_toml)
    train_fields, model_fields = _train_and_model_fields(
        toml, lr_steps, dict(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                             warmup_iters=warmup_iters, max_iters=max_iters, seed=seed, device=device, workers=workers,
                             amp=amp, log_every=log_every, checkpoint_every=checkpoint_every, eval_every=eval_every,
                             backbone_weights=str(backbone_weights) if backbone_weights else None,
                             group_by=group_by),
        dict(depth=depth, base_width=base_width, fpn_channels=fpn_channels, head_channels=head_channels,
             stacked_convs=stacked_convs, gn_groups=gn_groups, reg_max=reg_max, num_classes=num_classes,
             frozen_stages=frozen_stages, norm_eval=norm_eval))
    loss_fields = {**toml.get("loss", {}), **_given(
        ld_weight=ld_weight, ld_temperature=ld_temperature, vlr_weight=vlr_weight, vlr_gamma=vlr_gamma,
        vlr_iou=vlr_iou, kd_weight=kd_weight, kd_temperature=kd_temperature, kd_mode=kd_mode, dfl_weight=dfl_weight,
        ld_normalization=ld_normalization)}
    if cache is not None:
        from cache_teacher.targets import CacheTeacher

        source = CacheTeacher(source)
    else:
        from detector.runtime import resolve_device
        from distill.teachers import OnlineTeacher

        source = OnlineTeacher.from_checkpoint(teacher, _given(gn_groups=teacher_gn_groups),
                                               resolve_device(train_fields.get("device", "auto")),
                                               amp=train_fields.get("amp", "auto"))
    _run_training(data, model_fields, train_fields, loss_fields, out, resume, teacher=source, what="LD student")


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Option(help="our checkpoint or an mmdetection GFL checkpoint")],
    out: Annotated[Path, typer.Option(help="COCO results json to write; metrics go to OUT with .metrics.json")] = Path("results.json"),
    images: Images = None, ann: Ann = None, img_scale: ImgScale = None,
    depth: Depth = None, base_width: BaseWidth = None, fpn_channels: FpnChannels = None,
    head_channels: HeadChannels = None, stacked_convs: StackedConvs = None, gn_groups: GnGroups = None,
    reg_max: RegMax = None, num_classes: NumClasses = None,
    batch_size: Annotated[int, typer.Option(help="images per forward (equal canvases only, so results do not change)")] = 1,
    device: Device = None, workers: Workers = None,
    amp: Annotated[str, typer.Option(help="auto (bf16 on CUDA), off, bf16, fp16")] = "auto",
):
    """COCO AP of a checkpoint on a dataset, printed as a table and saved as JSON."""
    from detector.checkpoint import load_state_dict_strict, read_checkpoint, resolve_model_config
    from detector.coco import CocoDetection
    from detector.evaluation import format_metrics_table, save_results
    from detector.inference import evaluate_model
    from detector.model import build_detector
    from detector.runtime import resolve_device
    from detector.views import DEFAULT_IMG_SCALE, ViewSpec

    ckpt = read_checkpoint(checkpoint)
    model_cfg = resolve_model_config(ckpt, depth=depth, base_width=base_width, fpn_channels=fpn_channels,
                                     head_channels=head_channels, stacked_convs=stacked_convs, gn_groups=gn_groups,
                                     reg_max=reg_max, num_classes=num_classes)
    if (images is None) != (ann is None):
        raise UserError("give both --images and --ann (or neither, for the synthetic validation set)")
    trained_scale = ckpt.get("run_config", {}).get("data", {}).get("img_scale")
    if images is None:
        images, ann = _synthetic_split("val")
        scale = trained_scale or SYNTHETIC_IMG_SCALE
    else:
        scale = trained_scale or DEFAULT_IMG_SCALE
    if img_scale is not None:
        scale = _parse_pair(img_scale, "--img-scale")
    dataset = CocoDetection(images, ann, views=[ViewSpec(False, tuple(scale))], strides=model_cfg.strides, train=False)
    if dataset.num_classes != model_cfg.num_classes:
        raise UserError(f"the checkpoint predicts {model_cfg.num_classes} classes but {ann} has {dataset.num_classes}; "
                        "evaluate on the dataset it was trained for")
    dev = resolve_device(device or "auto")
    model = build_detector(model_cfg)
    load_state_dict_strict(model, ckpt["state_dict"], source=f"checkpoint {checkpoint}")
    model.to(dev)
    metrics, results = evaluate_model(model, dataset, dev, batch_size, workers if workers is not None else 2, amp)
    save_results(out, results)
    metrics_path = out.with_suffix(".metrics.json")
    metrics_path.write_text(json.dumps({"metrics": metrics, "checkpoint": str(checkpoint), "ann": str(ann),
                                        "img_scale": list(scale), "model": model_cfg.to_dict()}, indent=2) + "\n")
    typer.echo(format_metrics_table(metrics))
    typer.echo(f"{len(results)} detections on {len(dataset)} images -> {out}; metrics -> {metrics_path}")


@app.command("demo")
def demo_cmd(
    workdir: Annotated[Path, typer.Option(help="every artefact goes here; a second run reuses finished steps")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="a tiny version (under ~2 minutes on 2 CPU cores), for CI")] = False,
    device: Device = None, workers: Workers = None,
):
    """The whole product on the synthetic data: teacher, dump, inspect, plain and LD students, one table."""
    from distill.demo import run_demo

    report = run_demo(workdir, quick=quick, device=device or "auto", workers=workers if workers is not None else 2,
                      echo=typer.echo)
    typer.echo("")
    typer.echo(report["table"])


@app.command("sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep_cmd(
    ctx: typer.Context,
    cache: Annotated[str, typer.Option(help="the teacher cache every point reads")],
    grid: Annotated[list[str], typer.Option(help="name=v1,v2,... of a train-student option; repeat for a cartesian product")],
    out: Annotated[Path, typer.Option(help="sweep folder: one run per point, sweep.md, sweep.json, sweep.png")] = Path("runs/sweep"),
    jobs: Annotated[int, typer.Option(help="points trained at once (each a process)")] = 1,
):
    """Train one student per grid point from ONE cache; re-running skips finished points and resumes
    killed ones. Further options (e.g. --config recipe.toml --epochs 6) go to every train-student run."""
    from distill.sweep import parse_grid, point_name, run_sweep

    points = parse_grid(grid)
    from cache_teacher.reader import TeacherCache

    options = ctx.args[ctx.args.index("--storage-options") + 1] if "--storage-options" in ctx.args else None
    TeacherCache(cache, _storage_options(options)).require_complete()  # fail now, not once per point
    typer.echo(f"sweep of {len(points)} students over {cache} -> {out} ({jobs} at a time)")

    def report(r):
        ap = f"AP {100 * r.metrics['AP']:.1f}" if r.metrics else f"see {r.run_dir}/log.txt"
        typer.echo(f"  {r.status:8s} {point_name(r.overrides)}: {ap}")

    results = run_sweep(cache, points, list(ctx.args), out, jobs, on_result=report)
    typer.echo((out / "sweep.md").read_text())
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
    from distill.plots import plot_runs

    typer.echo(f"wrote {plot_runs(runs, out, smooth)}")


BOX_DTYPES = {"fp16": "float16", "uint8": "uint8", "fp32": "float32"}


def _parse_scales(text: str | None) -> tuple[tuple[int, int], ...]:
    if not text:
        return ()
    return tuple(_parse_pair(part, "--extra-scales") for part in text.split(";") if part.strip())


@app.command("dump-teacher")
def dump_teacher_cmd(
    teacher: Annotated[Path, typer.Option(help="teacher checkpoint (ours, or mmdetection GFL with architecture flags)")],
    out: Annotated[str, typer.Option(help="Zarr v3 store to write: a folder or an fsspec URL")] = "runs/teacher-cache.zarr",
    images: Images = None, ann: Ann = None, img_scale: ImgScale = None,
    views: Annotated[str, typer.Option(help="views to cache per image: orig, hflip or both")] = "orig,hflip",
    extra_scales: Annotated[Optional[str], typer.Option(help="more scales, each with the same views: 'L1,S1;L2,S2'")] = None,
    batch_size: Annotated[int, typer.Option(help="views per teacher forward (equal canvases only)")] = 8,
    box_dtype: Annotated[str, typer.Option(help="fp16 (reference), uint8 (per row-edge affine) or fp32")] = "fp16",
    no_cls: Annotated[bool, typer.Option("--no-cls", help="do not store class logits (no Main KD from this cache)")] = False,
    compressor: Annotated[str, typer.Option(help="none, zstd or lz4 (fp16 logits compress weakly; none reads fastest)")] = "none",
    shard_mb: Annotated[float, typer.Option(help="target shard size in MiB (the unit of writing and of resume)")] = 64.0,
    store_regions: Annotated[str, typer.Option(help="dense (every location) or main+vlr (only the rows LD and KD read)")] = "dense",
    min_vlr_gamma: Annotated[float, typer.Option(help="main+vlr: store the VLR for every gamma >= this")] = 0.25,
    vlr_iou: Annotated[str, typer.Option(help="main+vlr: official or diou, as the students will use")] = "official",
    overwrite: Annotated[bool, typer.Option(help="replace an existing store of another identity")] = False,
    storage_options: StorageOptions = None,
    device: Device = None, workers: Workers = None,
    amp: Annotated[str, typer.Option(help="auto (bf16 on CUDA), off, bf16, fp16")] = "auto",
    depth: Depth = None, base_width: BaseWidth = None, fpn_channels: FpnChannels = None,
    head_channels: HeadChannels = None, stacked_convs: StackedConvs = None, gn_groups: GnGroups = None,
    reg_max: RegMax = None, num_classes: NumClasses = None,
):
    """Run the teacher once over every view of the dataset and write its logits to a Zarr v3 cache."""
    from cache_teacher.dump import DumpConfig, run_dump
    from detector.checkpoint import read_checkpoint
    from detector.views import DEFAULT_IMG_SCALE

    if box_dtype not in BOX_DTYPES:
        raise UserError(f"--box-dtype must be one of {sorted(BOX_DTYPES)}, got {box_dtype!r}")
    if (images is None) != (ann is None):
        raise UserError("give both --images and --ann (or neither, for the synthetic dataset)")
    scale = _parse_pair(img_scale, "--img-scale") if img_scale else None
    if images is None:
        images, ann = _synthetic_split("train")
        scale = scale or SYNTHETIC_IMG_SCALE
    if scale is None:  # our checkpoints know the scale their teacher was trained at
        trained = read_checkpoint(teacher).get("run_config", {}).get("data", {}).get("img_scale")
        scale = tuple(trained) if trained else DEFAULT_IMG_SCALE
    cfg = DumpConfig(
        teacher=str(teacher), images=str(images), ann=str(ann), out=str(out), views=views, img_scale=tuple(scale),
        extra_scales=_parse_scales(extra_scales), batch_size=batch_size, device=device or "auto",
        workers=workers if workers is not None else 2, amp=amp, box_dtype=BOX_DTYPES[box_dtype],
        cls_dtype=None if no_cls else "float16", compressor=compressor, shard_mb=shard_mb, overwrite=overwrite,
        storage_options=_storage_options(storage_options), store_regions=store_regions,
        min_vlr_gamma=min_vlr_gamma, vlr_iou=vlr_iou,
        arch=_given(depth=depth, base_width=base_width, fpn_channels=fpn_channels, head_channels=head_channels,
                    stacked_convs=stacked_convs, gn_groups=gn_groups, reg_max=reg_max, num_classes=num_classes),
    )
    result = run_dump(cfg)
    if result["already_complete"]:
        say(f"{out} is already complete; nothing to do")
    else:
        share = " (rank 0's share)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        say(f"wrote {result['views']:,} views{share} ({result['bytes_written'] / 2**20:,.1f} MiB) in "
                   f"{result['seconds']:.1f} s ({result['views'] / max(result['seconds'], 1e-9):.1f} views/s); "
                   f"{'complete' if result['complete'] else 'incomplete'}: {out}")


@app.command("inspect-cache")
def inspect_cache_cmd(
    store: Annotated[str, typer.Argument(help="cache folder or fsspec URL")],
    json_out: Annotated[bool, typer.Option("--json", help="print the summary (and verification) as JSON")] = False,
    verify: Annotated[bool, typer.Option(help="check completeness, finite values, identity (and fidelity with --teacher)")] = False,
    teacher: Annotated[Optional[Path], typer.Option(help="with --verify: the teacher to re-run on --num-views random views")] = None,
    num_views: Annotated[int, typer.Option(help="views re-run by --verify --teacher")] = 8,
    png: Annotated[Optional[Path], typer.Option(help="write a picture of --view: GT, decoded detections, edge distributions")] = None,
    view: Annotated[int, typer.Option(help="view index for --png")] = 0,
    images: Annotated[Optional[Path], typer.Option(help="image folder [default: where the dump found it]")] = None,
    ann: Annotated[Optional[Path], typer.Option(help="annotation file [default: where the dump found it]")] = None,
    device: Device = None, storage_options: StorageOptions = None,
):
    """What a cache holds, whether it is whole and faithful (--verify), and a picture (--png)."""
    from cache_teacher.inspect import format_summary, format_verify, render_png, summarize
    from cache_teacher.inspect import verify as run_verify
    from cache_teacher.reader import TeacherCache
    from detector.runtime import resolve_device

    cache = TeacherCache(store, _storage_options(storage_options))
    report = {"summary": summarize(cache)}
    if verify:
        report["verify"] = run_verify(cache, str(teacher) if teacher else None, images, ann, num_views,
                                      device=str(resolve_device(device or "auto")))
    if png is not None:
        report["png"] = str(render_png(cache, view, png, images, ann))
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(format_summary(report["summary"]))
        if verify:
            typer.echo(format_verify(report["verify"]))
        if png is not None:
            typer.echo(f"picture of view {view} -> {report['png']}")
    if verify and not report["verify"]["ok"]:
        raise typer.Exit(1)


def say(message: str, err: bool = False) -> None:
    """Print for humans once: under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(message, err=err)


def _one_line(err: UserError) -> str:
    """A UserError raised in a DataLoader worker comes back with the worker's traceback folded into
    its message; the user needs only the original message, which is its last line."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(f"{UserError.__name__}: ", 1)[-1]
    return text.splitlines()[0] if text else type(err).__name__


def main() -> None:
    from detector.distributed import shutdown

    try:
        app()
    except UserError as err:
        say(f"error: {_one_line(err)}", err=True)
        sys.exit(2)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
