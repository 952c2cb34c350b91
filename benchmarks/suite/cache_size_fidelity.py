"""Bytes per view on disk and fidelity of the stored box distributions, per storage mode.

    .venv/bin/python -m benchmarks.suite.cache_size_fidelity                   # CPU, synthetic, ~1 min
    .venv/bin/python -m benchmarks.suite.cache_size_fidelity --teacher runs/teacher/checkpoints/last.pt
    .venv/bin/python -m benchmarks.suite.cache_size_fidelity --device cuda --img-scale 1333,800 \
        --images coco/train2017 --ann coco/annotations/instances_train2017.json --num-images 32 --teacher CKPT

The same views are dumped once per mode (fp16 box+cls, uint8 box+cls, fp16 --no-cls, uint8
--no-cls, fp16 box+cls with zstd and with lz4). Size: bytes on disk per view, compression ratio
(stored rows / bytes on disk) and size relative to fp16 box+cls. Fidelity: the teacher runs again in
fp32 on the same views (batches of equal padded canvas, which is the cache's definition of a view's
maps up to float noise) and every edge of every row is compared with the stored logits:
KL(fresh || stored) at T = 10 (detector.distributions.distribution_kl, the LD loss per edge),
mean, p99 and max; plus the largest absolute error of class logits. In float32 (what training
computes) its rounding leaves a noise floor near 1e-6 per edge at T = 10 (means can even come out
negative), so the same KL in float64 is reported beside it.

Goal: uint8 box logits with mean KL <= 1e-5. The dump runs with --amp off by default so the numbers
measure storage alone (with --amp auto a CUDA dump runs in bf16 and its error is included).
Fidelity needs realistic logits: a random teacher's box logits are nearly flat, so its KL numbers
say little (the output says when the weights are random); pass --teacher for meaningful figures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import numpy as np
import torch

from benchmarks.harness import common
from cache_teacher.dump import DumpConfig, run_dump
from cache_teacher.inspect import summarize
from cache_teacher.reader import CacheReader
from data.coco import collate
from data.config import DataConfig
from detector.checkpoint import load_model
from detector.distributions import distribution_kl
from detector.rows import flatten_rows

SCRIPT = "cache_size_fidelity"
# name -> (box dtype, cls dtype or None, compressor)
MODES = {
    "fp16 box+cls": ("float16", "float16", "none"),
    "uint8 box+cls": ("uint8", "float16", "none"),
    "fp16 no-cls": ("float16", None, "none"),
    "uint8 no-cls": ("uint8", None, "none"),
    "fp16 box+cls zstd": ("float16", "float16", "zstd"),
    "fp16 box+cls lz4": ("float16", "float16", "lz4"),
    "fp32 box+cls": ("float32", "float32", "none"),
}
DEFAULT_MODES = list(MODES)[:6]
REFERENCE = "fp16 box+cls"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_teacher_args(p)
    common.add_data_args(p, num_images=32)
    common.add_run_args(p, SCRIPT)
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--batch-size", type=int, default=8, help="dump batch size and fresh-forward batch size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", default="off",
                   help="autocast of the dump: off (default, storage error only) | auto | bf16 | fp16")
    p.add_argument("--temperature", type=float, default=10.0)
    p.add_argument("--shard-mb", type=float, default=64.0)
    return p.parse_args(argv)


@torch.no_grad()
def compare(teacher, dataset, keys, caches: dict[str, CacheReader], device, reg_max: int, temperature: float,
            workers: int) -> dict[str, dict]:
    """One fp32 forward over the views; each view's fresh rows against every cache's stored rows."""
    kls = {name: [] for name in caches}
    kls64 = {name: [] for name in caches}
    box_err = {name: 0.0 for name in caches}
    cls_err = {name: 0.0 for name in caches}
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=workers, collate_fn=collate)
    for views, batch in zip(keys, loader):
        cls_maps, box_maps = teacher(batch.images.to(device))
        n = len(views)
        level_hw = [r.level_hw for r in batch.records]  # equal canvases: the maps' own sizes
        # [B, rows, 4(n+1)]
        fresh_box = flatten_rows(box_maps, level_hw).float().cpu().reshape(n, -1, box_maps[0].shape[1])
        fresh_cls = flatten_rows(cls_maps, level_hw).float().cpu().reshape(n, -1, cls_maps[0].shape[1])  # [B, rows, C]
        for i, (image_index, spec_index) in enumerate(views):
            for name, cache in caches.items():
                stored = cache.read_view(cache.view_index(image_index, spec_index))
                fresh, kept = fresh_box[i].reshape(-1, reg_max + 1), stored.box.reshape(-1, reg_max + 1)
                kls[name].append(distribution_kl(kept, fresh, temperature).double().numpy())  # float32
                kls64[name].append(distribution_kl(kept, fresh, temperature, torch.float64).numpy())
                box_err[name] = max(box_err[name], float((fresh_box[i] - stored.box).abs().max()))
                if stored.cls is not None:
                    cls_err[name] = max(cls_err[name], float((fresh_cls[i] - stored.cls).abs().max()))
    out = {}
    for name, cache in caches.items():
        kl, kl64 = np.concatenate(kls[name]), np.concatenate(kls64[name])
        out[name] = {"edges": int(kl.size), "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
                     "kl_max": float(kl.max()), "kl64_mean": float(kl64.mean()),
                     "kl64_p99": float(np.percentile(kl64, 99)), "kl64_max": float(kl64.max()),
                     "box_max_abs_err": box_err[name],
                     "cls_max_abs_err": cls_err[name] if cache.has_cls else None}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    common.apply_threads(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {list(MODES)}")
    with common.work_folder(args.workdir) as workdir:
        images, ann = common.prepare_data(args, workdir)
        teacher_path, teacher_cfg, random_weights = common.prepare_teacher(args, common.num_classes_of(ann), workdir)
        teacher_info = common.teacher_summary(teacher_path, teacher_cfg, random_weights)
        print(common.describe_teacher(teacher_info), file=sys.stderr)

        caches, dump_seconds = {}, {}
        for name in modes:
            box_dtype, cls_dtype, compressor = MODES[name]
            store = workdir / (name.replace(" ", "_").replace("+", "-") + ".zarr")
            shutil.rmtree(store, ignore_errors=True)
            cfg = DumpConfig(teacher=teacher_path, out=str(store),
                             data=DataConfig(images=images, ann=ann, views=args.views, img_scale=args.img_scale),
                             batch_size=args.batch_size, device=args.device,
                             workers=args.workers, amp=args.amp, box_dtype=box_dtype, cls=cls_dtype is not None,
                             compressor=compressor, shard_mb=args.shard_mb)
            start = time.perf_counter()
            run_dump(cfg, progress=False)
            dump_seconds[name] = time.perf_counter() - start
            caches[name] = CacheReader(store)
            print(f"dumped {name} in {dump_seconds[name]:.1f} s", file=sys.stderr)

        teacher, _ = load_model(teacher_path, {}, device)
        dataset = common.build_dataset(images, ann, args, teacher_cfg.strides)
        keys, _ = common.dump_batches(dataset, teacher_cfg, "float16", "float16", args.shard_mb, args.batch_size)
        num_views = sum(len(k) for k in keys)
        fidelity = compare(teacher, dataset, keys, caches, device, teacher_cfg.reg_max, args.temperature, args.workers)

        rows = []
        sizes = {name: summarize(cache) for name, cache in caches.items()}
        reference = sizes.get(REFERENCE, next(iter(sizes.values())))["bytes_per_view"]
        for name in modes:
            box_dtype, cls_dtype, compressor = MODES[name]
            s = sizes[name]
            rows.append({"mode": name, "box_dtype": box_dtype, "cls_dtype": cls_dtype, "compressor": compressor,
                         "views": s["views"], "bytes_on_disk": s["bytes_on_disk"],
                         "kb_per_view": s["bytes_per_view"] / 1024, "relative_size": s["bytes_per_view"] / reference,
                         "compression_ratio": s["compression_ratio"], "dump_seconds": dump_seconds[name],
                         **fidelity[name]})
        columns = [("mode", "mode", ""), ("kb_per_view", "KB/view", ".1f"), ("relative_size", f"vs {REFERENCE}", ".3f"),
                   ("compression_ratio", "compression", ".2f"), ("kl_mean", "KL mean", ".3g"),
                   ("kl_p99", "KL p99", ".3g"), ("kl_max", "KL max", ".3g"), ("kl64_mean", "KL mean fp64", ".3g"),
                   ("kl64_p99", "KL p99 fp64", ".3g"), ("box_max_abs_err", "box max |err|", ".3g"),
                   ("cls_max_abs_err", "cls max |err|", ".3g")]
        note = ("RANDOM teacher weights: box logits are nearly flat, so these KL figures understate the error on a "
                "trained teacher" if random_weights else f"trained teacher {teacher_path}")
        print(f"\n{common.describe_teacher(teacher_info)}\n{num_views} views at {args.img_scale}, device {device}, "
              f"dump amp {args.amp}; KL(fresh fp32 || stored) at T={args.temperature:g} over "
              f"{rows[0]['edges']:,} edges (KL = distributions.distribution_kl, float32, noise floor ~1e-6; "
              f"fp64 = the same formula in float64); goal uint8 KL mean <= 1e-5; {note}\n")
        print(common.markdown_table(rows, columns))
        out = common.write_results(args.out, args, rows, device, teacher=teacher_info,
                                   data={"images": images, "ann": ann, "num_images": len(dataset),
                                         "num_views": num_views},
                                   notes=note)
        print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
