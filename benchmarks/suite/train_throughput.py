"""Does training from the cache run at the speed of plain training? Student steps/s side by side.

    .venv/bin/python -m benchmarks.suite.train_throughput                      # CPU, synthetic, a few minutes
    .venv/bin/python -m benchmarks.suite.train_throughput --steps 4 --rounds 1 --num-images 16   # smoke run
    .venv/bin/python -m benchmarks.suite.train_throughput --device cuda --amp bf16 --img-scale 1344,800 \\
        --student-depth 18 --teacher-depth 101 --full-width --batch-size 8 --workers 8 \\
        --num-images 64 --steps 40 --warmup 5 --rounds 3

Variants (benchmarks/harness/steps.py): plain, cache, cache-mem, online, each the engine's
train_step on a fresh seeded student over the engine's seeded batches; the step's time includes
waiting for the DataLoader (reported apart as "data wait"). Variants alternate for --rounds rounds;
the table gives medians, "x plain" the median of per-round ratios. On CUDA: peak memory.

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
import sys
from pathlib import Path

import torch

from benchmarks.harness import common, steps
from cache_teacher.reader import CacheReader
from cache_teacher.targets import CachedTeacher
from core.errors import UserError
from detector.config import ModelConfig
from distill.config import LossConfig, config_to_dict
from distill.teachers import OnlineTeacher

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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    r.add_argument("--profile", action="store_true",
                   help="also break the last round's steps down by phase (torch.profiler): data wait, teacher, "
                        "forward, assignment, GFL losses, distillation, backward, optimizer")
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


def student_config(args, num_classes: int) -> ModelConfig:
    return ModelConfig(depth=args.student_depth, num_classes=num_classes, base_width=args.student_base_width,
                       fpn_channels=args.student_fpn_channels, head_channels=args.student_head_channels,
                       stacked_convs=args.student_stacked_convs, frozen_stages=args.student_frozen_stages,
                       norm_eval=args.student_norm_eval == "true")


def run(args, device: torch.device, workdir: Path) -> None:
    images, ann = common.prepare_data(args, workdir)
    num_classes = common.num_classes_of(ann)
    cache = CacheReader(args.cache) if args.cache else None
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
        location = workdir / "train-bench.zarr"
        dump_seconds = steps.make_cache(teacher_path, images, ann, location, args.views, args.img_scale,
                                                args.batch_size, args.device, args.workers, args.amp, args.box_dtype,
                                                args.shard_mb)
        cache = CacheReader(location)
        print(f"dumped {location} in {dump_seconds:.1f} s (not part of the comparison)", file=sys.stderr)

    loss = LossConfig()
    teachers: dict = {}
    if "cache" in args.variants:
        teachers["cache"] = CachedTeacher(cache)
    if "cache-mem" in args.variants:
        teachers["cache-mem"] = steps.InMemoryCachedTeacher(cache)
    if "online" in args.variants:
        # on the CPU until its variant runs
        teachers["online"] = OnlineTeacher.from_checkpoint(teacher_path, {}, torch.device("cpu"), amp=args.amp)
    for teacher in teachers.values():
        teacher.validate(dataset, cfg, loss.teacher_needs())

    bench = steps.StepBench(dataset, cfg, teachers, device, args.batch_size, args.workers, args.amp,
                                    args.optimizer, args.lr, args.seed, loss)
    num_views = len(dataset) * len(dataset.views)
    print(f"student GFL R-{cfg.depth} width {cfg.base_width}, fpn {cfg.fpn_channels}, head {cfg.head_channels}x"
          f"{cfg.stacked_convs}; {common.describe_teacher(teacher_info)}\n{len(dataset)} images ({num_views} views), "
          f"batch {args.batch_size}, {args.workers} workers, device {device}, amp {args.amp}, {args.optimizer}",
          file=sys.stderr)

    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for rnd in range(args.rounds):
        for variant in args.variants:
            result = bench.run(variant, args.steps, args.warmup, profile=args.profile and rnd == args.rounds - 1)
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
    print(f"\nstudent R-{cfg.depth} (width {cfg.base_width}, "
          f"{cfg.fpn_channels}/{cfg.head_channels}x{cfg.stacked_convs}); "
          f"{common.describe_teacher(teacher_info)}; device {device}, amp {args.amp}, {args.img_scale[0]}x"
          f"{args.img_scale[1]}, batch {args.batch_size}, {args.workers} workers, {len(dataset)} images; medians of "
          f"{args.rounds} alternating rounds of {args.steps} steps after {args.warmup} warm-up steps; x plain = "
          "median of per-round ratios (goal: cache >= 0.95)\n")
    print(common.markdown_table(rows, columns))
    phases = {v: runs[v][-1]["phases_ms"] for v in args.variants if "phases_ms" in runs[v][-1]}
    if phases:
        order = ["data wait", *steps.PHASES]
        names = sorted(dict.fromkeys(k for p in phases.values() for k in p),
                       key=lambda k: order.index(k.split(" (")[0]))
        print("\nms per step by phase (last round, under torch.profiler; losses = assignment + gfl_losses + "
              "distillation)\n")
        print(common.markdown_table([{"phase": n, **{v: p.get(n) for v, p in phases.items()}} for n in names],
                                    [("phase", "phase", "")] + [(v, v, ".1f") for v in phases]))
    ratios = [f"{name} {summary[key]:.3f}"
              for name, key in (("cache/plain", "cache_vs_plain"), ("cache-mem/plain", "cache_mem_vs_plain"),
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
            "location": cache.location if args.cache else None, "reused": bool(args.cache),
            "dump_seconds": dump_seconds, "box_dtype": meta.box_dtype, "cls_dtype": meta.cls_dtype,
            "compressor": meta.layout.compressor, "mb_on_disk": sum(cache.bytes_on_disk().values()) / MB},
        notes="a step = the engine's step incl. waiting for the DataLoader, the finite-loss check and the per-step "
              "loss read-out; worker start-up is in the untimed warm-up; each (variant, round) uses a fresh student "
              "from the same seed and a fresh DataLoader over the same seeded batches")
    print(f"\nwrote {out}", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    common.apply_threads(args)
    with common.work_folder(args.workdir) as workdir:
        try:
            run(args, device, workdir)
        except UserError as err:
            sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
