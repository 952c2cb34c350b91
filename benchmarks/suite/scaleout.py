"""Scale-out figures: dump-teacher with 1 and 2 processes (torchrun), and cache reads from local
disk against an S3 endpoint (a moto server on 127.0.0.1, standing in for object storage).

    .venv/bin/python -m benchmarks.suite.scaleout                        # CPU, synthetic data, a few minutes
    .venv/bin/python -m benchmarks.suite.scaleout --teacher runs/synth/teacher.pt --num-images 1000

The dumps run as real `cli.py dump-teacher` processes (one plain, one plain with 1 thread, one
under `torchrun --nproc_per_node 2` with 1 thread per process) on the same images into fresh
stores, and the 2-process store is compared byte for byte with the 1-thread one (on CPU the float
sums of a convolution depend on the thread count, so that is the like-for-like pair); the table
gives wall seconds of the whole command (start-up included, so use enough images) and views/s.
Reads: one process reading random views (box + cls, decoded) from the local store and from the same cache uploaded to
the S3 endpoint. On a 2-core CPU two dump processes share the cores a single process already uses; the
scaling figure that matters is on several GPUs, which this project has not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import common, reads
from cache_teacher.reader import CacheReader

CLI = str(common.REPO_ROOT / "cli.py")


def _dump(cmd_prefix: list[str], args, images: str, ann: str, teacher: str, out: str, env: dict, extra=()) -> float:
    cmd = [*cmd_prefix, CLI, "dump-teacher", "--teacher", teacher, "--images", images, "--ann", ann, "--out", out,
           "--img-scale", f"{args.img_scale[0]},{args.img_scale[1]}", "--views", args.views,
           "--workers", str(args.dump_workers), "--batch-size", str(args.batch_size), "--shard-mb", str(args.shard_mb),
           *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dump failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def _reads(location: str, options: dict | None, args, workers: int = 0) -> dict:
    cache = CacheReader(location, options)
    views = reads.ViewReads(cache, ("box", "cls"))
    nbytes = reads.stored_bytes_per_view(cache, ("box", "cls"))
    reads.measure(views, 0, reads.RandomViews(len(cache.records), args.seed, len(cache.records)),
                  args.seconds, nbytes)  # warm-up pass
    runs = [reads.measure(views, workers, reads.RandomViews(len(cache.records), args.seed + r),
                          args.seconds, nbytes) for r in range(args.repeats)]
    return {"views_per_s": common.median([r["views_per_s"] for r in runs]),
            "mb_per_s": common.median([r["mb_per_s"] for r in runs])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_teacher_args(p)
    common.add_data_args(p, num_images=256)
    common.add_run_args(p, "scaleout")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dump-workers", type=int, default=1, help="DataLoader workers per dump process")
    p.add_argument("--shard-mb", type=float, default=8.0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    common.apply_threads(args)
    with tempfile.TemporaryDirectory(prefix="ldcache-scaleout-") as tmp:
        work = Path(tmp)
        images, ann = common.prepare_data(args, work)
        teacher, teacher_cfg, random_weights = common.prepare_teacher(args, common.num_classes_of(ann), work)
        env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}
        rows = []
        views = len(args.views.split(",")) * len(json.loads(Path(ann).read_text())["images"])
        one = _dump([sys.executable], args, images, ann, teacher, str(work / "one.zarr"), env)
        # Byte identity needs the same kernels: on CPU a convolution's float sums depend on the intra-op
        # thread count, so the 2-process dump (1 thread each) is compared with a 1-process, 1-thread dump.
        single = {**env, "OMP_NUM_THREADS": "1"}
        one_thread = _dump([sys.executable], args, images, ann, teacher, str(work / "one-thread.zarr"), single)
        two = _dump([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                    args, images, ann, teacher, str(work / "two.zarr"), single)
        two_store = work / "two.zarr"
        stored = [f for f in two_store.rglob("*") if f.is_file() and f != two_store / "zarr.json"]  # root: a date
        identical = all((work / "one-thread.zarr" / f.relative_to(two_store)).read_bytes() == f.read_bytes()
                        for f in stored)
        same = "bytes identical to 1 process, 1 thread" if identical else "BYTES DIFFER from 1 process, 1 thread"
        for name, seconds, note in (("dump, 1 process", one, "torch's default threads"),
                                    ("dump, 1 process, 1 thread", one_thread, ""),
                                    ("dump, torchrun 2 processes x 1 thread", two, same)):
            rows.append({"variant": name, "seconds": seconds, "views_per_s": views / seconds,
                         "ratio": one / seconds, "note": note})

        import s3fs
        from moto.server import ThreadedMotoServer  # the test extras install it

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
            os.environ.update(creds)
            s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("bench")
            options = {"endpoint_url": endpoint}
            s3_seconds = _dump([sys.executable], args, images, ann, teacher, "s3://bench/cache.zarr", {**env, **creds},
                               ["--storage-options", json.dumps(options)])
            rows.append({"variant": "dump, 1 process, to S3 (moto)", "seconds": s3_seconds,
                         "views_per_s": views / s3_seconds, "ratio": one / s3_seconds, "note": ""})
            for name, location, opts, workers in (
                    ("read, local disk", str(work / "one.zarr"), None, 0),
                    ("read, S3 (moto on 127.0.0.1)", "s3://bench/cache.zarr", options, 0),
                    ("read, S3 (moto), 4 DataLoader workers", "s3://bench/cache.zarr", options, 4)):
                r = _reads(location, opts, args, workers)
                rows.append({"variant": name, "views_per_s": r["views_per_s"], "mb_per_s": r["mb_per_s"], "note": ""})
        finally:
            server.stop()
    print(common.markdown_table(rows, [("variant", "variant", ""), ("seconds", "wall s", ".1f"),
                                       ("views_per_s", "views/s", ".1f"), ("mb_per_s", "MB/s", ".1f"),
                                       ("ratio", "x 1 process", ".2f"), ("note", "", "")]))
    print(f"teacher: {common.describe_teacher(common.teacher_summary(teacher, teacher_cfg, random_weights))}",
          file=sys.stderr)
    common.write_results(args.out, args, rows, common.resolve_device("cpu"), views=views)


if __name__ == "__main__":
    main()
