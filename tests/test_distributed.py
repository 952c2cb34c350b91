"""torchrun with 2 CPU processes (gloo): a distributed dump equals a single-process one byte for
byte, and distributed training logs the losses of a single process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_MODEL_FLAGS, store_array_files


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _single(*args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=600)


def _torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "cli.py"), *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


# dense, and the compact ld+bckd layout, whose region rows live in shards of their own beside the dense ones
# (smaller shards for the smaller rows, so both layouts are cut into several)
@pytest.mark.parametrize("regions", [["--shard-mb", "0.05"], ["--store-regions", "ld+bckd", "--shard-mb", "0.02"]],
                         ids=["dense", "ld+bckd"])
def test_distributed_dump_is_byte_identical(tiny_coco, tiny_teacher, tmp_path, regions):
    args = ["dump-teacher", "--teacher", tiny_teacher["path"], "--images", tiny_coco["images"], "--ann",
            tiny_coco["ann"], "--img-scale", "96,96", "--workers", "0", "--batch-size", "2", *regions]
    single = _single(*args, "--out", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    proc = _torchrun(*args, "--out", tmp_path / "multi")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert store_array_files(tmp_path / "multi") == store_array_files(tmp_path / "single")
    meta = json.loads((tmp_path / "multi" / "zarr.json").read_text())["attributes"]["ldcache"]
    assert meta["complete"]  # rank 0 finalised after both ranks finished
    assert meta["layout"]["num_shards"] >= 3  # each rank wrote shards of its own
    # Each rank wrote whole shards of its own: resuming the finished dump has nothing to do.
    again = _torchrun(*args, "--out", tmp_path / "multi")
    assert again.returncode == 0 and "already complete" in again.stdout


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("command", ["train-detector", "train-student"])
def test_distributed_training_matches_one_process_with_the_global_batch(command, tiny_coco, tiny_teacher, tmp_path):
    common = ["--images", tiny_coco["images"], "--ann", tiny_coco["ann"], "--img-scale", "96,96", "--workers", "0",
              *TINY_MODEL_FLAGS, "--max-iters", "2", "--log-every", "1", "--lr", "0.01", "--warmup-iters", "2",
              "--epochs", "3", "--group-by", "canvas"]
    # --group-by canvas: GroupNorm sees the padded canvas, so a rank's half of a global batch must be
    # padded as the whole batch is; batches of one canvas guarantee it.
    if command == "train-student":
        cache = tmp_path / "cache"
        assert _single("dump-teacher", "--teacher", tiny_teacher["path"], "--images", tiny_coco["images"], "--ann",
                       tiny_coco["ann"], "--img-scale", "96,96", "--workers", "0", "--out", cache).returncode == 0
        # mean: the LD terms are normalised, not summed per process (official sums depend on the
        # images per process by design, so they cannot match across process counts).
        common += ["--cache", cache, "--ld-normalization", "mean"]
    single = _single(command, *common, "--batch-size", "4", "--out", tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _torchrun(command, *common, "--batch-size", "2", "--out", tmp_path / "multi")
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = _records(tmp_path / "single"), _records(tmp_path / "multi")
    assert [r["iter"] for r in b] == [1, 2]
    keys = [k for k in a[0] if k.startswith("loss")]
    for ra, rb in zip(a, b):
        for k in keys:  # the mean over ranks is the single-process value of the 4-image batch
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["iter"], k)
    assert json.loads((tmp_path / "multi" / "config.json").read_text())["world_size"] == 2
    assert (tmp_path / "multi" / "checkpoints" / "last.pt").exists()


def test_two_process_evaluation_equals_one_process(tiny_coco, tmp_path):
    """Each rank predicts its share of the images, rank 0 gathers and scores: the same detections
    and the same metrics as one process."""
    train = ["train-detector", "--images", tiny_coco["images"], "--ann", tiny_coco["ann"], "--img-scale", "96,96",
             "--workers", "0", *TINY_MODEL_FLAGS, "--epochs", "40", "--lr", "0.02", "--batch-size", "10",
             "--views", "orig", "--warmup-iters", "5", "--lr-steps", "100", "--log-every", "20",
             "--out", tmp_path / "run"]
    assert _single(*train).returncode == 0
    # On its (overfitted) training images the detector finds objects: detections to compare.
    args = ["evaluate", "--checkpoint", tmp_path / "run" / "checkpoints" / "last.pt", "--images",
            tiny_coco["images"], "--ann", tiny_coco["ann"], "--workers", "0", "--batch-size", "2"]
    one = _single(*args, "--out", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(*args, "--out", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("AP50") == 1  # rank 0 alone reports
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert len(a) > 0 and a == b  # identical detections (sorted by image id)
    ma = json.loads((tmp_path / "one.metrics.json").read_text())["metrics"]
    assert ma == json.loads((tmp_path / "two.metrics.json").read_text())["metrics"]


def test_distributed_training_evaluates_on_every_rank_and_logs_once(tiny_coco, tmp_path):
    args = ["train-detector", "--images", tiny_coco["images"], "--ann", tiny_coco["ann"], "--img-scale", "96,96",
            "--workers", "0", *TINY_MODEL_FLAGS, "--epochs", "2", "--batch-size", "2", "--eval-every", "1",
            "--val-images", tiny_coco["val_images"], "--val-ann", tiny_coco["val_ann"], "--out", tmp_path / "run"]
    proc = _torchrun(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if "AP" in r] == [1, 2]  # after epoch 1 and at the end, written once
    assert set(json.loads((tmp_path / "run" / "eval.json").read_text())["metrics"]) >= {"AP", "AP50"}


def test_online_teacher_under_torchrun_gives_the_cached_runs_losses(tiny_coco, tiny_teacher, tiny_cache, tmp_path):
    """Each rank runs its teacher on its own device and batch (the online path), and logs what the
    same 2-process run reads from the teacher's cache: equal up to the cache's fp16 rounding."""
    common = ["--images", tiny_coco["images"], "--ann", tiny_coco["ann"], "--img-scale", "96,96", "--workers", "0",
              *TINY_MODEL_FLAGS, "--max-iters", "2", "--log-every", "1", "--lr", "0.01", "--warmup-iters", "2",
              "--epochs", "3", "--group-by", "canvas", "--batch-size", "2", "--ld-normalization", "mean"]
    cached = _torchrun("train-student", *common, "--cache", tiny_cache, "--out", tmp_path / "cached")
    assert cached.returncode == 0, cached.stderr[-3000:]
    online = _torchrun("train-student", *common, "--teacher", tiny_teacher["path"], "--out", tmp_path / "online")
    assert online.returncode == 0, online.stderr[-3000:]
    a, b = _records(tmp_path / "cached"), _records(tmp_path / "online")
    assert [r["iter"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for k in ("loss", "loss_ld", "loss_ld_vlr", "loss_kd"):
            assert rb[k] != 0.0
            assert rb[k] == pytest.approx(ra[k], rel=3e-3, abs=1e-6), (ra["iter"], k)
    teacher = json.loads((tmp_path / "online" / "config.json").read_text())["teacher"]
    assert (teacher["kind"] == "online"
            and json.loads((tmp_path / "online" / "config.json").read_text())["world_size"] == 2)
