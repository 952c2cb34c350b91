"""Caches at fsspec URLs, against a local S3-compatible server (moto) on 127.0.0.1: dump to a
bucket, inspect it, train a student from it, kill the dump and resume it."""

import json
import os
import signal
import subprocess
import sys
import time

import moto.server as moto_server  # noqa: E402  (test extras)
import numpy as np
import pytest
import s3fs  # noqa: E402

from tests.conftest import ROOT, TINY_MODEL_FLAGS

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # the usual environment variables carry the credentials
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("ldcache-test")
    yield {"endpoint": endpoint, "fs": fs, "options": json.dumps({"endpoint_url": endpoint})}
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cli(*args, **kw):
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run(*args):
    proc = _cli(*args)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _dump_args(tiny, teacher, out, options):
    return ["dump-teacher", "--teacher", teacher, "--images", tiny["images"], "--ann", tiny["ann"], "--out", out,
            "--img-scale", "384,384", "--workers", "0", "--batch-size", "1", "--shard-mb", "0.05",
            "--storage-options", options]


def test_dump_inspect_train_and_resume_on_s3(s3, tiny_coco, tiny_teacher, tmp_path):
    fs, options = s3["fs"], s3["options"]
    url = "s3://ldcache-test/killed.zarr"
    # Kill the dump once it has stored a shard, then run the same command again.
    proc = _cli(*_dump_args(tiny_coco, tiny_teacher["path"], url, options))
    deadline = time.time() + 180
    progress = "ldcache-test/killed.zarr/progress/c"
    while proc.poll() is None and time.time() < deadline:
        if fs.exists(progress) and fs.ls(progress, refresh=True):  # a shard is stored and flagged
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
        fs.invalidate_cache()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    code, out, err = _run(*_dump_args(tiny_coco, tiny_teacher["path"], url, options))
    assert code == 0, err[-2000:]

    # The same bytes as a dump to local disk.
    code, _, err = _run(*_dump_args(tiny_coco, tiny_teacher["path"], tmp_path / "local.zarr", options))
    assert code == 0, err[-2000:]
    local = tmp_path / "local.zarr"
    fs.invalidate_cache()  # s3fs remembers the listings it made while polling
    stored = [p for p in sorted(local.rglob("*")) if p.is_file() and p != local / "zarr.json"]  # root attrs hold a date
    assert len(stored) > 20
    for path in stored:
        key = "ldcache-test/killed.zarr/" + str(path.relative_to(local))
        assert fs.cat(key) == path.read_bytes(), key

    code, out, err = _run("inspect-cache", url, "--verify", "--json", "--storage-options", options)
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert report["summary"]["complete"] and report["verify"]["ok"] and report["summary"]["views"] == 20

    code, out, err = _run("train-student", "--cache", url, "--storage-options", options, "--images",
                          tiny_coco["images"], "--ann", tiny_coco["ann"], "--out", tmp_path / "student",
                          "--workers", "2", *TINY_MODEL_FLAGS, "--batch-size", "4", "--max-iters", "2",
                          "--log-every", "1")
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss_ld"]) for r in records)

    # Rows of a complete cache on S3 come from ranged reads of the shard objects: the same bytes as
    # zarr-python's reads of the same store and as the local copy.
    from cache_teacher.reader import CacheReader

    remote, here = CacheReader(url, json.loads(options)), CacheReader(local)
    assert remote.raw("box") is not None and remote.raw("cls") is not None
    for v in range(len(remote.records)):
        got, expected = remote.read_rows(v), here.read_rows(v)
        through_zarr = remote.read_rows(v, direct=False)
        for name in ("box", "cls"):
            assert got[name].tobytes() == expected[name].tobytes() == through_zarr[name].tobytes(), (v, name)


def test_missing_bucket_object_is_a_clear_error(s3):
    code, _, err = _run("inspect-cache", "s3://ldcache-test/nothing.zarr", "--storage-options", s3["options"])
    assert code == 2 and "no cache at" in err and "Traceback" not in err


def test_a_prefix_of_other_objects_is_never_replaced(s3, tiny_coco, tiny_teacher):
    fs = s3["fs"]
    fs.pipe("ldcache-test/results/notes.txt", b"precious")  # not a Zarr store: a new store would clear it
    for extra in ([], ["--overwrite"]):
        code, _, err = _run(*_dump_args(tiny_coco, tiny_teacher["path"], "s3://ldcache-test/results", s3["options"]),
                            *extra)
        assert code == 2 and "holds files that are not a Zarr store" in err and "Traceback" not in err, err[-2000:]
    fs.invalidate_cache()
    assert fs.cat("ldcache-test/results/notes.txt") == b"precious"
