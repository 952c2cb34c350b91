"""Is writing the cache hidden behind the teacher? Teacher-forward-only loop vs the full run_dump.

    .venv/bin/python -m benchmarks.suite.dump_throughput                       # CPU, synthetic, ~1-2 min
    .venv/bin/python -m benchmarks.suite.dump_throughput --device cuda --img-scale 1333,800 \
        --num-images 500 --batch-size 8 --shard-mb 64 --teacher CKPT --repeats 3

Both variants run the same views in the same batches (views of equal padded canvas, cut at shard
boundaries, as run_dump batches them) through a DataLoader with the same workers. (a) forward:
loader -> teacher forward (no grad, the dump's autocast) -> discard. (b) dump: run_dump into a fresh
temporary store (teacher forward + encoding + device-to-host copy + the writer thread filling and
storing whole shards). Variants alternate a/b/a/b for --repeats rounds; the table gives medians.

Goal: dump views/s >= 0.9 x forward views/s (the writer thread and zarr hidden behind the teacher).
Writing can only overlap the forward when a run spans several shards: --shard-mb defaults to 2 so
that a 256-px synthetic view (~0.2 MB) gets about 10 views per shard, the same as a 64 MB shard of
6.6 MB COCO views.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import torch

from benchmarks.harness import common
from cache_teacher.dump import DumpConfig, run_dump
from cache_teacher.reader import CacheReader
from core.runtime import autocast_for
from data.coco import collate
from data.config import DataConfig
from detector.checkpoint import load_model

SCRIPT = "dump_throughput"
MB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_teacher_args(p)
    common.add_data_args(p, num_images=64)
    common.add_run_args(p, SCRIPT)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (both variants)")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA, none on CPU) | off | bf16 | fp16")
    p.add_argument("--box-dtypes", default="float16,uint8", help="comma list; one dump variant each")
    p.add_argument("--no-cls", action="store_true", help="dump without class logits")
    p.add_argument("--compressor", default="none", help="none | zstd | lz4")
    p.add_argument("--shard-mb", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args(argv)


@torch.no_grad()
def forward_only(teacher, dataset, keys, device: torch.device, workers: int, amp: str) -> float:
    """Seconds of loader -> forward -> discard over all batches (worker start-up included, as in
    run_dump's own timing)."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    common.sync(device)
    start = time.perf_counter()
    for batch in loader:
        with autocast_for(device, amp):
            teacher(batch.images.to(device, non_blocking=True))
    common.sync(device)
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    common.apply_threads(args)
    if device.type == "cuda":  # run_dump sets these (deterministic bytes); the forward loop must match
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    box_dtypes = [d.strip() for d in args.box_dtypes.split(",") if d.strip()]
    cls_dtype = None if args.no_cls else "float16"
    with common.work_folder(args.workdir) as workdir:
        images, ann = common.prepare_data(args, workdir)
        teacher_path, teacher_cfg, random_weights = common.prepare_teacher(args, common.num_classes_of(ann), workdir)
        teacher_info = common.teacher_summary(teacher_path, teacher_cfg, random_weights)
        teacher, _ = load_model(teacher_path, {}, device)
        dataset = common.build_dataset(images, ann, args, teacher_cfg.strides)
        keys, layout = common.dump_batches(
            dataset, teacher_cfg, box_dtypes[0], cls_dtype, args.shard_mb, args.batch_size
        )
        num_views = sum(len(k) for k in keys)
        print(
            f"{common.describe_teacher(teacher_info)}\n{len(dataset)} images, {num_views} views, {len(keys)} batches, "
            f"{layout.num_shards} shards of {layout.rows_per_shard} rows, device {device}",
            file=sys.stderr,
        )

        runs: dict[str, list[dict]] = {"forward": [], **{f"dump {d}": [] for d in box_dtypes}}
        for rep in range(args.repeats):
            seconds = forward_only(teacher, dataset, keys, device, args.workers, args.amp)
            runs["forward"].append({"seconds": seconds, "views": num_views})
            print(f"[{rep}] forward      {num_views / seconds:7.2f} views/s", file=sys.stderr)
            for box_dtype in box_dtypes:
                store = workdir / f"dump-{box_dtype}-{rep}.zarr"
                cfg = DumpConfig(teacher=teacher_path, out=str(store),
                                 data=DataConfig(images=images, ann=ann, views=args.views, img_scale=args.img_scale),
                                 batch_size=args.batch_size, device=args.device,
                                 workers=args.workers, amp=args.amp, box_dtype=box_dtype, cls=cls_dtype is not None,
                                 compressor=args.compressor, shard_mb=args.shard_mb)
                wall_start = time.perf_counter()
                result = run_dump(cfg, progress=False)
                wall = time.perf_counter() - wall_start
                on_disk = sum(CacheReader(store).bytes_on_disk().values())
                runs[f"dump {box_dtype}"].append({
                    "seconds": result["seconds"], "wall_seconds": wall, "views": result["views"],
                    "bytes_written": result["bytes_written"], "bytes_on_disk": on_disk,
                    "num_shards": result["num_shards"], "complete": result["complete"],
                    "ratio_to_forward_same_round": seconds / result["seconds"],
                })
                shutil.rmtree(store, ignore_errors=True)
                print(f"[{rep}] dump {box_dtype:8s}{result['views'] / result['seconds']:7.2f} views/s "
                      f"({on_disk / MB:.1f} MB on disk)", file=sys.stderr)

        rows = []
        forward_vps = common.median([r["views"] / r["seconds"] for r in runs["forward"]])
        for name, reps in runs.items():
            vps = common.median([r["views"] / r["seconds"] for r in reps])
            row = {"variant": name, "views": reps[0]["views"], "seconds": common.median([r["seconds"] for r in reps]),
                   "views_per_s": vps, "repeats": reps}
            if name.startswith("dump"):
                row.update({
                    "ratio": common.median([r["ratio_to_forward_same_round"] for r in reps]),
                    "ratio_of_medians": vps / forward_vps,
                    "written_mb_per_s": common.median([r["bytes_written"] / r["seconds"] / MB for r in reps]),
                    "on_disk_mb": common.median([r["bytes_on_disk"] / MB for r in reps]),
                    "on_disk_kb_per_view": common.median([r["bytes_on_disk"] / r["views"] / 1024 for r in reps]),
                    "wall_seconds": common.median([r["wall_seconds"] for r in reps]),
                })
            rows.append(row)
        columns = [("variant", "variant", ""), ("views", "views", "d"), ("seconds", "median s", ".2f"),
                   ("views_per_s", "views/s", ".2f"), ("ratio", "dump/forward", ".3f"),
                   ("written_mb_per_s", "written MB/s", ".1f"), ("on_disk_mb", "on disk MB", ".2f"),
                   ("on_disk_kb_per_view", "KB/view", ".1f"), ("wall_seconds", "run_dump wall s", ".2f")]
        print(f"\n{common.describe_teacher(teacher_info)}; device {device}; batch {args.batch_size}, "
              f"{args.workers} workers, shard {args.shard_mb} MB ({layout.num_shards} shards), "
              f"compressor {args.compressor}, cls {'no' if args.no_cls else 'fp16'}; medians of {args.repeats} "
              "alternating rounds; dump/forward = median of per-round ratios (goal >= 0.9)\n")
        print(common.markdown_table(rows, columns))
        out = common.write_results(args.out, args, rows, device, teacher=teacher_info,
                                   data={"images": images, "ann": ann, "num_images": len(dataset),
                                         "num_views": num_views, "num_batches": len(keys),
                                         "num_shards": layout.num_shards, "rows_per_shard": layout.rows_per_shard},
                                   notes="seconds = run_dump's own loop time (loader start to writer thread joined); "
                                         "wall = the whole run_dump call incl. teacher load and store creation; "
                                         "written MB/s counts the shard buffers handed to zarr (padding included)")
        print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
