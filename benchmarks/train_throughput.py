"""Does training from the cache run at the speed of plain training? Student steps/s side by side.

    .venv/bin/python benchmarks/train_throughput.py                      # CPU, synthetic, a few minutes
    .venv/bin/python benchmarks/train_throughput.py --steps 4 --rounds 1 --num-images 16   # smoke run
    .venv/bin/python benchmarks/train_throughput.py --device cuda --amp bf16 --img-scale 1344,800 \\
        --student-depth 18 --teacher-depth 101 --full-width --batch-size 8 --workers 8 \\
        --num-images 64 --steps 40 --warmup 5 --rounds 3

Four variants, same data (the same seeded batches of ViewBatchSampler, one view per image per
epoch, endless over epochs), same batch and the same freshly built student (seeded) each time:
- plain:  GFL losses only (QFL + GIoU + DFL), no teacher;
- cache:  CacheTeacher: the DataLoader workers read each view's cached rows (one contiguous slice
          per array) beside the image; the rows are decoded on the device; + Main LD, VLR LD, Main KD;
- cache-mem: the cache variant with every view's rows read once beforehand and served from
          memory: the same losses without the reads, so cache vs cache-mem is the cost of reading
          and cache-mem vs plain the cost of the distillation terms;
- online: OnlineTeacher: the teacher's forward (eval, no grad, the same autocast) on every batch;
          the same losses.
Each step is the engine's step (distill.engine.run_train): teacher.rows, the student forward under
autocast_for, compute_losses, the finite-loss check and the per-step loss read-out (both sync the
device, as the engine does), zero_grad, backward, optimizer step with the engine's learning rate.
Checkpoints, metrics files and evaluation are not part of it. A step's time includes waiting for
the DataLoader, so a reader that cannot keep up shows (and is reported apart: the time spent
waiting in next(loader), "data wait"; the engine's per-step loss read-out keeps the host in step
with the device, so this is waiting for data, not for the GPU). Each (variant, round) builds its own student,
optimizer and DataLoader; its iterator stays alive through --warmup untimed steps (worker start-up,
first reads, allocator warm-up) and the --steps timed steps. Variants alternate plain, cache,
online, plain, ... for --rounds rounds; the table gives medians, "x plain" the median of per-round
ratios. On CUDA: peak memory (torch.cuda.max_memory_allocated, reset before each variant; only that
variant's student, optimizer and, for online, teacher are on the device).

Without --cache, a cache of the used images (--num-images) is dumped first with run_dump into a
temporary folder (not timed as training). --cache STORE reuses one: it must have been dumped from
the same annotation (a --num-images subset is written deterministically, so its sha256 matches;
--num-images 0 for a whole file), views and --img-scale. Without --teacher the online teacher is a
seeded random teacher (of the cache's architecture when --cache is given): throughput does not
depend on the weights. --full-width gives student and teacher mmdetection's GFL widths (base 64,
FPN/head 256 channels, 4 convs; student stem + stage 1 frozen, BatchNorm in eval mode).

Goal: cache >= 0.95 x plain steps/s, and clearly faster than online.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402

from cache_teacher.dump import DumpConfig, run_dump  # noqa: E402
from detector.checkpoint import load_model  # noqa: E402
from cache_teacher.reader import TeacherCache  # noqa: E402
from detector.checkpoint import file_sha256  # noqa: E402
from detector.coco import collate  # noqa: E402
from detector.config import ModelConfig  # noqa: E402
from detector.errors import UserError  # noqa: E402
from detector.runtime import autocast_for  # noqa: E402
from detector.model import build_detector  # noqa: E402
from distill.config import LossConfig, TrainConfig, config_to_dict  # noqa: E402
from distill.criterion import compute_losses  # noqa: E402
from distill.engine import batch_groups, build_optimizer, lr_at  # noqa: E402
from distill.sampler import ViewBatchSampler  # noqa: E402
from cache_teacher.targets import CacheTeacher, TargetSample  # noqa: E402
from distill.teachers import OnlineTeacher  # noqa: E402

SCRIPT = "train_throughput"
MB = 2**20
STUDENT_RECIPE = common.REPO_ROOT / "configs" / "synthetic-student.toml"
# configs/synthetic-student.toml's architecture, used when that file cannot be read.
STUDENT_FALLBACK = dict(depth=18, base_width=16, fpn_channels=64, head_channels=64, stacked_convs=2,
                        frozen_stages=0, norm_eval=False)
FULL = ModelConfig()  # mmdetection's GFL widths: base 64, 256 channels, 4 convs, frozen stem + stage 1
VARIANTS = ("plain", "cache", "cache-mem", "online")


def _student_defaults() -> dict:
    model = common.read_recipe_model(STUDENT_RECIPE)
    return {k: type(v)(model.get(k, v)) for k, v in STUDENT_FALLBACK.items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="an existing cache of the same data; default: dump one into a temporary folder")
    common.add_teacher_args(p)
    t = p.add_argument_group("teacher aliases")
    for name in ("depth", "base-width", "fpn-channels", "head-channels", "stacked-convs"):
        t.add_argument(f"--teacher-{name}", dest=name.replace("-", "_"), type=int, default=argparse.SUPPRESS,
                       help=f"= --{name}")
    s = p.add_argument_group("student (default: the architecture of configs/synthetic-student.toml)")
    student = _student_defaults()
    s.add_argument("--student-depth", type=int, default=student["depth"])
    s.add_argument("--student-base-width", type=int, default=student["base_width"])
    s.add_argument("--student-fpn-channels", type=int, default=student["fpn_channels"])
    s.add_argument("--student-head-channels", type=int, default=student["head_channels"])
    s.add_argument("--student-stacked-convs", type=int, default=student["stacked_convs"])
    s.add_argument("--student-frozen-stages", type=int, default=student["frozen_stages"])
    s.add_argument("--student-norm-eval", choices=("true", "false"), default=str(student["norm_eval"]).lower())
    p.add_argument("--full-width", action="store_true",
                   help="student and teacher at mmdetection's GFL widths (base 64, 256 channels, 4 convs; student "
                        "frozen_stages 1, norm_eval true); explicit width options still win")
    common.add_data_args(p, num_images=64)
    common.add_run_args(p, SCRIPT)
    r = p.add_argument_group("training")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--workers", type=int, default=2, help="DataLoader workers (every variant, and the dump)")
    r.add_argument("--amp", default="auto", help="auto (bf16 on CUDA, none on CPU) | off | bf16 | fp16")
    r.add_argument("--optimizer", default="sgd", help="sgd (the 1x recipe) | adamw")
    r.add_argument("--lr", type=float, help="default: the engine's (0.01 x batch / 16 for SGD)")
    r.add_argument("--variants", default=",".join(VARIANTS), help="comma list of plain, cache, cache-mem, online")
    r.add_argument("--steps", type=int, default=15, help="timed steps per variant and round")
    r.add_argument("--warmup", type=int, default=3, help="untimed steps before them (same loader iterator)")
    r.add_argument("--rounds", type=int, default=2)
    d = p.add_argument_group("the dump made when --cache is not given")
    d.add_argument("--box-dtype", default="float16", help="float16 | uint8 | float32")
    d.add_argument("--shard-mb", type=float, default=64.0)

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--full-width", action="store_true")
    if pre.parse_known_args(argv)[0].full_width:
        widths = dict(base_width=FULL.base_width, fpn_channels=FULL.fpn_channels, head_channels=FULL.head_channels,
                      stacked_convs=FULL.stacked_convs)
        p.set_defaults(**widths, **{f"student_{k}": v for k, v in widths.items()},
                       student_frozen_stages=FULL.frozen_stages, student_norm_eval=str(FULL.norm_eval).lower())
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1, --warmup >= 0")
    return args


class EndlessBatches:
    """ViewBatchSampler's batches, epoch after epoch (a run shorter or longer than an epoch sees the
    engine's batches in the engine's order)."""

    def __init__(self, sampler: ViewBatchSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.sampler
            epoch += 1


class InMemoryTargets(torch.utils.data.Dataset):
    """CachedTargets with every view's stored rows read up front: a step pays no cache read."""

    def __init__(self, cached):
        self.cached = cached
        self.rows = {(i, s): cached.stored_rows((i, s)) for i in range(len(cached.base))
                     for s in range(len(cached.base.views))}

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, key):
        key = tuple(key)
        return TargetSample(self.cached.base[key], dict(self.rows[key]))  # collate may replace entries


class InMemoryCacheTeacher(CacheTeacher):
    def dataset(self, base, needs):
        return InMemoryTargets(super().dataset(base, needs))


class Bench:
    """What every (variant, round) shares: data, configs, teachers."""

    def __init__(self, args, device, dataset, student_cfg: ModelConfig, teachers: dict):
        self.args, self.device, self.dataset, self.student_cfg, self.teachers = args, device, dataset, student_cfg, teachers
        self.train = TrainConfig(batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
                                 device=str(device), amp=args.amp, workers=args.workers)
        self.loss = LossConfig()  # the paper's full recipe: Main LD + VLR LD + Main KD
        self.groups = batch_groups(dataset, "orientation")

    def run(self, variant: str) -> dict:
        args, device, train, cfg = self.args, self.device, self.train, self.student_cfg
        cuda = device.type == "cuda"
        teacher = self.teachers.get(variant)
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if isinstance(teacher, OnlineTeacher):
            teacher.model.to(device)

        torch.manual_seed(train.seed)
        model = build_detector(cfg).to(device)
        optimizer = build_optimizer(train, [p for p in model.parameters() if p.requires_grad])
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and train.amp == "fp16")
        base_lr = train.base_lr()
        sampler = ViewBatchSampler(self.groups, batch_size=train.batch_size, seed=train.seed)
        data = teacher.dataset(self.dataset, self.loss.teacher_needs()) if teacher is not None else self.dataset
        loader = torch.utils.data.DataLoader(data, batch_sampler=EndlessBatches(sampler), num_workers=train.workers,
                                             collate_fn=teacher.collate if teacher is not None else collate,
                                             pin_memory=cuda, persistent_workers=False)
        model.train()
        it = iter(loader)
        window: dict[str, float] = {}
        waited = [0.0]  # seconds spent in next(it): the loader not keeping up

        def step(iteration: int) -> int:
            """One engine step (distill.engine.run_train); returns the images in the batch."""
            t0 = time.perf_counter()
            item = next(it)
            waited[0] += time.perf_counter() - t0
            batch, stored = item if isinstance(item, tuple) else (item, None)
            lr = lr_at(train, base_lr, iteration, 0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            teacher_rows = teacher.rows(batch, stored, device) if teacher is not None else None
            with autocast_for(device, train.amp):
                cls_out, box_out = model(batch.images.to(device, non_blocking=True))
            losses = compute_losses(
                cls_out, box_out, [r.level_hw for r in batch.records],
                [b.to(device) for b in batch.boxes], [lab.to(device) for lab in batch.labels],
                self.loss, cfg.num_classes, cfg.reg_max, cfg.strides, teacher_rows,
            )
            if not torch.isfinite(losses["loss"]):
                raise UserError(f"{variant}: the loss became {float(losses['loss'])} at step {iteration + 1}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            for k, v in losses.items():  # the engine reads every loss out each step (metrics window)
                window[k] = float(v.detach())
            return len(batch.records)

        try:
            launch = time.perf_counter()
            for i in range(args.warmup):
                step(i)
            common.sync(device)
            waited[0] = 0.0
            start = time.perf_counter()
            images = sum(step(args.warmup + i) for i in range(args.steps))
            common.sync(device)
            seconds = time.perf_counter() - start
        finally:
            del it, loader  # shuts the workers down
            if isinstance(teacher, OnlineTeacher):
                teacher.model.to("cpu")
        peak = torch.cuda.max_memory_allocated(device) / MB if cuda else None
        del model, optimizer
        return {"steps": args.steps, "images": images, "seconds": seconds, "steps_per_s": args.steps / seconds,
                "images_per_s": images / seconds, "warmup_seconds": start - launch,
                "data_wait_ms_per_step": 1000 * waited[0] / args.steps, "peak_gpu_mb": peak,
                "last_losses": dict(window)}


def make_cache(args, images: str, ann: str, teacher_path: str, workdir: Path) -> tuple[str, float]:
    """Dump the teacher over the used images; restore the cuDNN flags run_dump sets (a student run
    is a separate process with the defaults)."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    store = workdir / "train-bench.zarr"
    cfg = DumpConfig(teacher=teacher_path, images=images, ann=ann, out=str(store), views=args.views,
                     img_scale=args.img_scale, batch_size=args.batch_size, device=args.device, workers=args.workers,
                     amp=args.amp, box_dtype=args.box_dtype, cls_dtype="float16", shard_mb=args.shard_mb)
    start = time.perf_counter()
    try:
        run_dump(cfg, progress=False)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags
    return str(store), time.perf_counter() - start


def student_config(args, num_classes: int) -> ModelConfig:
    return ModelConfig(depth=args.student_depth, num_classes=num_classes, base_width=args.student_base_width,
                       fpn_channels=args.student_fpn_channels, head_channels=args.student_head_channels,
                       stacked_convs=args.student_stacked_convs, frozen_stages=args.student_frozen_stages,
                       norm_eval=args.student_norm_eval == "true")


def run(args, device: torch.device, workdir: Path) -> None:
    images, ann = common.prepare_data(args, workdir)
    num_classes = common.num_classes_of(ann)
    cache = TeacherCache(args.cache) if args.cache else None
    if cache is not None and not args.teacher:  # a random online teacher of the cached teacher's architecture
        arch = cache.meta.teacher_config
        for key in ("depth", "base_width", "fpn_channels", "head_channels", "stacked_convs"):
            setattr(args, key, int(arch[key]))
    teacher_path, teacher_cfg, random_weights = common.prepare_teacher(args, num_classes, workdir)
    teacher_info = common.teacher_summary(teacher_path, teacher_cfg, random_weights)
    cfg = student_config(args, num_classes)
    dataset = common.build_dataset(images, ann, args, cfg.strides)
    dataset.check_files()

    dump_seconds = None
    if {"cache", "cache-mem"} & set(args.variants) and cache is None:
        location, dump_seconds = make_cache(args, images, ann, teacher_path, workdir)
        cache = TeacherCache(location)
        print(f"dumped {location} in {dump_seconds:.1f} s (not part of the comparison)", file=sys.stderr)

    loss = LossConfig()
    teachers: dict = {}
    if "cache" in args.variants:
        teachers["cache"] = CacheTeacher(cache)
    if "cache-mem" in args.variants:
        teachers["cache-mem"] = InMemoryCacheTeacher(cache)
    if "online" in args.variants:
        model, online_cfg = load_model(teacher_path, {}, torch.device("cpu"))  # moved to the device when used
        teachers["online"] = OnlineTeacher(model, online_cfg, file_sha256(teacher_path), amp=args.amp)
    for teacher in teachers.values():
        teacher.validate(dataset, cfg, loss.teacher_needs())

    bench = Bench(args, device, dataset, cfg, teachers)
    num_views = len(dataset) * len(dataset.views)
    print(f"student GFL R-{cfg.depth} width {cfg.base_width}, fpn {cfg.fpn_channels}, head {cfg.head_channels}x"
          f"{cfg.stacked_convs}; {common.describe_teacher(teacher_info)}\n{len(dataset)} images ({num_views} views), "
          f"batch {args.batch_size}, {args.workers} workers, device {device}, amp {args.amp}, {args.optimizer}",
          file=sys.stderr)

    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for rnd in range(args.rounds):
        for variant in args.variants:
            result = bench.run(variant)
            runs[variant].append(result)
            mem = f", peak {result['peak_gpu_mb']:.0f} MB" if result["peak_gpu_mb"] is not None else ""
            print(f"[{rnd}] {variant:9s} {result['steps_per_s']:7.3f} steps/s {result['images_per_s']:8.2f} images/s "
                  f"(warm-up {result['warmup_seconds']:.1f} s{mem}, loss {result['last_losses'].get('loss', 0):.3f})",
                  file=sys.stderr)

    def per_round_ratio(a: str, b: str) -> float | None:
        if a not in runs or b not in runs:
            return None
        return common.median([x["steps_per_s"] / y["steps_per_s"] for x, y in zip(runs[a], runs[b])])

    rows = []
    for variant in args.variants:
        reps = runs[variant]
        sps = common.median([r["steps_per_s"] for r in reps])
        peaks = [r["peak_gpu_mb"] for r in reps if r["peak_gpu_mb"] is not None]
        rows.append({"variant": variant, "steps_per_s": sps,
                     "images_per_s": common.median([r["images_per_s"] for r in reps]),
                     "ms_per_step": 1000 / sps,
                     "data_wait_ms": common.median([r["data_wait_ms_per_step"] for r in reps]),
                     "x_plain": per_round_ratio(variant, "plain"),
                     "peak_gpu_mb": max(peaks) if peaks else None, "repeats": reps})
    summary = {
        "cache_vs_plain": per_round_ratio("cache", "plain"),
        "online_vs_plain": per_round_ratio("online", "plain"),
        "cache_mem_vs_plain": per_round_ratio("cache-mem", "plain"),  # the distillation terms alone
        # > 1: the cache is that many times faster than the online teacher (= online s/step / cache s/step)
        "cache_speedup_over_online": per_round_ratio("cache", "online"),
        "goal_cache_vs_plain": 0.95,
    }
    # "clearly ahead of online": at least 5 % more steps/s (only checked when online was measured)
    summary["goal_met"] = None if summary["cache_vs_plain"] is None else bool(
        summary["cache_vs_plain"] >= 0.95
        and (summary["cache_speedup_over_online"] is None or summary["cache_speedup_over_online"] >= 1.05))

    columns = [("variant", "variant", ""), ("steps_per_s", "steps/s", ".3f"), ("images_per_s", "images/s", ".2f"),
               ("ms_per_step", "ms/step", ".1f"),
               ("data_wait_ms", "of which data wait ms", ".1f"), ("x_plain", "x plain", ".3f")]
    if device.type == "cuda":
        columns.append(("peak_gpu_mb", "peak GPU MB", ".0f"))
    print(f"\nstudent R-{cfg.depth} (width {cfg.base_width}, {cfg.fpn_channels}/{cfg.head_channels}x{cfg.stacked_convs}); "
          f"{common.describe_teacher(teacher_info)}; device {device}, amp {args.amp}, {args.img_scale[0]}x"
          f"{args.img_scale[1]}, batch {args.batch_size}, {args.workers} workers, {len(dataset)} images; medians of "
          f"{args.rounds} alternating rounds of {args.steps} steps after {args.warmup} warm-up steps; x plain = "
          "median of per-round ratios (goal: cache >= 0.95)\n")
    print(common.markdown_table(rows, columns))
    ratios = [f"{name} {summary[key]:.3f}" for name, key in (("cache/plain", "cache_vs_plain"),
                                                              ("cache-mem/plain", "cache_mem_vs_plain"),
                                                              ("online/plain", "online_vs_plain"),
                                                              ("cache speed-up over online", "cache_speedup_over_online"))
              if summary[key] is not None]
    if ratios:
        print("\n" + "; ".join(ratios) + (f"; goal {'met' if summary['goal_met'] else 'NOT met'}"
                                          if summary["goal_met"] is not None else ""))
    meta = cache.meta if cache is not None else None
    out = common.write_results(
        args.out, args, rows, device, summary=summary, teacher=teacher_info, student=cfg.to_dict(),
        loss=config_to_dict(loss),
        data={"images": images, "ann": ann, "num_images": len(dataset), "num_views": num_views},
        cache=None if meta is None else {
            "location": cache.location if args.cache else None, "reused": bool(args.cache), "dump_seconds": dump_seconds,
            "box_dtype": meta.box_dtype, "cls_dtype": meta.cls_dtype, "compressor": meta.layout.compressor, "mb_on_disk": sum(cache.bytes_on_disk().values()) / MB},
        notes="a step = the engine's step incl. waiting for the DataLoader, the finite-loss check and the per-step "
              "loss read-out; worker start-up is in the untimed warm-up; each (variant, round) uses a fresh student "
              "from the same seed and a fresh DataLoader over the same seeded batches")
    print(f"\nwrote {out}", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    common.apply_threads(args)
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="ldcache-bench-")) if owned else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(args, device, workdir)
    except UserError as err:
        sys.exit(f"error: {err}")
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
