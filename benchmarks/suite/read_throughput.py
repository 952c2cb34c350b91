"""How fast can a student read cached views? CacheReader.read_view in random order.

    .venv/bin/python -m benchmarks.suite.read_throughput                       # dumps a small cache, ~1 min
    .venv/bin/python -m benchmarks.suite.read_throughput --cache runs/teacher-cache.zarr --seconds 10 --repeats 3
    .venv/bin/python -m benchmarks.suite.read_throughput --box-dtype uint8 --img-scale 1333,800 --num-images 64

Variants, alternated round by round for --repeats rounds (the table gives medians):
- single process, box+cls decoded to float32 (no DataLoader);
- single process, box only (kinds=("box",)): what a run without class KD reads;
- DataLoader with 2 and 4 workers (--workers-list), box+cls; a Dataset whose __getitem__ reads one
  view, batch_size=None, the same seeded random order. Worker start-up is timed apart (time to
  the first view) and left out of views/s.
MB/s counts the stored (encoded) bytes of the arrays read (before any compressor).

Page cache: every view is read once before measuring (the warm-up pass, reported as its own row),
so all measured reads are warm, served from memory; a freshly dumped cache is warm already. Cold
reads from disk or object storage are slower and not measured here.

Goal (cache spec): the reader must keep up with the student. An R-18 student on an H200 eats up to
163 views/s (the spec's bare-network step, 49.1 ms a batch of 8), i.e. about 1.1 GB/s of dense fp16
targets at 1344x800.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from benchmarks.harness import common
from benchmarks.harness.reads import RandomViews, ViewReads, measure, stored_bytes_per_view
from cache_teacher.dump import DumpConfig, run_dump
from cache_teacher.reader import CacheReader
from data.config import DataConfig

SCRIPT = "read_throughput"
# Measuring more workers than cores is the point of the 4-worker variant on a small machine.
warnings.filterwarnings("ignore", message="This DataLoader will create")
MB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cache", help="an existing cache to read; default: dump one into a temporary folder")
    common.add_teacher_args(p)
    common.add_data_args(p, num_images=64)
    common.add_run_args(p, SCRIPT)
    g = p.add_argument_group("the dump made when --cache is not given")
    g.add_argument("--box-dtype", default="float16", help="float16 | uint8 | float32")
    g.add_argument("--no-cls", action="store_true")
    g.add_argument("--compressor", default="none", help="none | zstd | lz4")
    g.add_argument("--shard-mb", type=float, default=64.0)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--dump-workers", type=int, default=2)
    p.add_argument("--workers-list", default="2,4", help="DataLoader worker counts to measure")
    p.add_argument("--seconds", type=float, default=2.0, help="per variant and round")
    p.add_argument("--num-reads", type=int, default=0, help="per variant and round; overrides --seconds")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def make_cache(args, workdir: Path) -> tuple[str, dict]:
    images, ann = common.prepare_data(args, workdir)
    teacher_path, teacher_cfg, random_weights = common.prepare_teacher(args, common.num_classes_of(ann), workdir)
    store = workdir / "read-bench.zarr"
    cfg = DumpConfig(teacher=teacher_path, out=str(store),
                     data=DataConfig(images=images, ann=ann, views=args.views, img_scale=args.img_scale),
                     batch_size=args.batch_size, device=args.device, workers=args.dump_workers,
                     box_dtype=args.box_dtype, cls=not args.no_cls,
                     compressor=args.compressor, shard_mb=args.shard_mb)
    start = time.perf_counter()
    run_dump(cfg, progress=False)
    print(f"dumped {store} in {time.perf_counter() - start:.1f} s "
          f"({'random' if random_weights else 'trained'} teacher; read speed does not depend on the weights)",
          file=sys.stderr)
    return str(store), common.teacher_summary(teacher_path, teacher_cfg, random_weights)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    common.apply_threads(args)
    with common.work_folder(args.workdir, keep=args.cache is not None) as workdir:
        teacher_info = None
        if args.cache:
            location = args.cache
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            location, teacher_info = make_cache(args, workdir)
        cache = CacheReader(location)
        cache.require_complete()
        num_views = len(cache.records)
        both = ("box", "cls") if cache.has_cls else ("box",)
        both += ("edges",) if cache.meta.regions.two_spaces else ()  # an ld+bckd cache: what BCKD reads too
        variants = [("single process, box+cls" if cache.has_cls else "single process, box", 0, both)]
        if cache.has_cls:
            variants.append(("single process, box only", 0, ("box",)))
        for w in [int(x) for x in args.workers_list.split(",") if x.strip()]:
            variants.append((f"DataLoader {w} workers, {'+'.join(both)}", w, both))

        # Warm-up: every view once, so that all measured reads come from the page cache.
        warm_ds = ViewReads(cache, both)
        warm_bytes = stored_bytes_per_view(cache, both)
        start = time.perf_counter()
        for v in range(num_views):
            warm_ds[v]
        warm_s = time.perf_counter() - start
        rows = [{"variant": "warm-up pass (each view once, in order)", "workers": 0, "kinds": list(both),
                 "views_per_s": num_views / warm_s, "mb_per_s": warm_bytes.sum() / warm_s / MB,
                 "kb_per_view": warm_bytes.mean() / 1024, "repeats": [{"reads": num_views, "seconds": warm_s}]}]

        runs = {name: [] for name, _, _ in variants}
        for rep in range(args.repeats):
            for name, workers, kinds in variants:
                sampler = RandomViews(num_views, args.seed, args.num_reads)
                result = measure(ViewReads(cache, kinds), workers, sampler, args.seconds,
                                 stored_bytes_per_view(cache, kinds))
                runs[name].append(result)
                print(f"[{rep}] {name:40s} {result['views_per_s']:8.1f} views/s {result['mb_per_s']:8.1f} MB/s",
                      file=sys.stderr)
        for name, workers, kinds in variants:
            reps = runs[name]
            rows.append({"variant": name, "workers": workers, "kinds": list(kinds),
                         "views_per_s": common.median([r["views_per_s"] for r in reps]),
                         "mb_per_s": common.median([r["mb_per_s"] for r in reps]),
                         "kb_per_view": stored_bytes_per_view(cache, kinds).mean() / 1024,
                         "startup_seconds": common.median([r["startup_seconds"] for r in reps]) if workers else None,
                         "repeats": reps})
        columns = [("variant", "variant", ""), ("views_per_s", "views/s", ".1f"), ("mb_per_s", "stored MB/s", ".1f"),
                   ("kb_per_view", "KB/view", ".1f"), ("startup_seconds", "worker start-up s", ".2f")]
        meta = cache.meta
        print(f"\ncache {location}: {num_views} views, box {meta.box_dtype}, cls "
              f"{meta.cls_dtype or 'not stored'}, compressor {meta.layout.compressor}; "
              f"medians of {args.repeats} alternating rounds of "
              f"{f'{args.num_reads} reads' if args.num_reads else f'{args.seconds:g} s'}; random order (seed "
              f"{args.seed}); warm page cache (one warm-up pass first)\n")
        print(common.markdown_table(rows, columns))
        out = common.write_results(args.out, args, rows, device, teacher=teacher_info,
                                   cache={"location": location, "views": num_views, "box_dtype": meta.box_dtype,
                                          "cls_dtype": meta.cls_dtype, "compressor": meta.layout.compressor},
                                   notes="warm page cache: every view was read once before measuring; MB/s = encoded "
                                         "bytes of the arrays read; DataLoader start-up excluded from views/s")
        print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
