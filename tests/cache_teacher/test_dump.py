"""The cache contracts of cache-spec: round trip, identity refusal, resume byte-identity (with a
real SIGKILL), determinism, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache_teacher.dump import DumpConfig, run_dump
from cache_teacher.reader import CacheReader
from core.errors import UserError
from data.coco import CocoDetection
from data.config import DataConfig
from detector import ModelConfig, build_detector, save_checkpoint
from tests.conftest import ROOT, TINY_MODEL, store_array_files


def _cfg(tiny, teacher, out, views=None, **kw):
    base = dict(teacher=str(teacher), out=str(out), workers=0, batch_size=3, shard_mb=0.05,
                data=DataConfig(images=str(tiny["images"]), ann=str(tiny["ann"]), img_scale=(96, 96), views=views))
    base.update(kw)
    return DumpConfig(**base)


def _teacher_rows(model, image):
    with torch.no_grad():
        cls_maps, box_maps = model(image[None])
    flat = lambda maps: torch.cat([m[0].permute(1, 2, 0).reshape(-1, m.shape[1]) for m in maps])  # noqa: E731
    return flat(box_maps), flat(cls_maps)


@pytest.mark.parametrize("box_dtype", ["float16", "uint8"])
def test_cached_rows_equal_the_teacher_forward(tiny_coco, tiny_teacher, tmp_path, box_dtype):
    result = run_dump(_cfg(tiny_coco, tiny_teacher["path"], tmp_path / "c", box_dtype=box_dtype), progress=False)
    assert result["complete"] and result["views"] == 20  # 10 images x (orig, hflip)
    cache = CacheReader(tmp_path / "c")
    dataset = CocoDetection(tiny_coco["images"], tiny_coco["ann"], views=cache.specs, train=True)
    worst_box, worst_cls = 0.0, 0.0
    for i in range(len(dataset)):
        for s in range(2):
            cached = cache.read_view(cache.view_index(i, s))
            sample = dataset[(i, s)]
            assert cached.record == sample.record  # the view table reproduces the student's geometry
            box, cls = _teacher_rows(tiny_teacher["model"], sample.image)
            worst_box = max(worst_box, float(((cached.box - box).abs() / (box.abs() + 1)).max()))
            worst_cls = max(worst_cls, float(((cached.cls - cls).abs() / (cls.abs() + 1)).max()))
    # fp16 rounding is 2^-11 relative; the uint8 step is span / 255 (spans of these logits are < 1).
    assert worst_box < (2**-10 if box_dtype == "float16" else 5e-3)
    assert worst_cls < 2**-10


def test_writer_to_reader_round_trip_is_exact_for_fp32(tiny_coco, tiny_teacher, tmp_path):
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], tmp_path / "c", box_dtype="float32"), progress=False)
    cache = CacheReader(tmp_path / "c")
    raw = zarr.open_group(str(tmp_path / "c"), mode="r")
    for v in range(len(cache.records)):
        off, n = int(cache.row_offset[v]), int(cache.num_rows[v])
        assert torch.equal(cache.read_view(v).box, torch.from_numpy(raw["box"][off:off + n]))


def docs_reading_snippet() -> str:
    """The Python block under docs/cache-format.md's "Reading without ldcache", as a user copies it."""
    text = (Path(__file__).parents[2] / "docs" / "cache-format.md").read_text()
    section = text.split("## Reading without ldcache", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("box_dtype", ["float16", "uint8"])
def test_plain_zarr_reads_a_view_as_the_docs_show(tiny_coco, tiny_teacher, tmp_path, box_dtype):
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], tmp_path / "c", box_dtype=box_dtype), progress=False)
    snippet = docs_reading_snippet()
    assert '"runs/teacher-cache.zarr"' in snippet
    scope: dict = {}
    exec(snippet.replace('"runs/teacher-cache.zarr"', repr(str(tmp_path / "c"))), scope)  # noqa: S102
    v, box, level_hw, meta = scope["v"], scope["box"], scope["level_hw"], scope["meta"]
    assert bool(zarr.open_group(str(tmp_path / "c"), mode="r")["views/flip"][v]) and meta["views"]["specs"][1]["flip"]
    assert box.shape == (int((level_hw[:, 0] * level_hw[:, 1]).sum()), 4 * (meta["reg_max"] + 1))
    assert np.array_equal(box, CacheReader(tmp_path / "c").read_view(v).box.numpy())
    assert scope["p3"].shape == (*level_hw[0], 4, meta["reg_max"] + 1)


def test_identity_refusal_and_overwrite(tiny_coco, tiny_teacher, tmp_path):
    out = tmp_path / "c"
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], out), progress=False)
    before = store_array_files(out)
    torch.manual_seed(5)
    other = tmp_path / "other.pt"
    config = ModelConfig(num_classes=5, **TINY_MODEL)
    save_checkpoint(other, build_detector(config), config)
    with pytest.raises(UserError, match="another identity.*teacher.*--overwrite"):
        run_dump(_cfg(tiny_coco, other, out), progress=False)
    with pytest.raises(UserError, match="another identity.*views"):
        run_dump(_cfg(tiny_coco, tiny_teacher["path"], out, views="orig"), progress=False)
    assert store_array_files(out) == before  # nothing already written was lost
    result = run_dump(_cfg(tiny_coco, tiny_teacher["path"], out), progress=False)
    assert result["already_complete"]  # the same command again has nothing to do
    run_dump(_cfg(tiny_coco, other, out, overwrite=True), progress=False)
    assert CacheReader(out).complete and store_array_files(out) != before


def test_dump_is_deterministic(tiny_coco, tiny_teacher, tmp_path):
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], tmp_path / "a"), progress=False)
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], tmp_path / "b", workers=2), progress=False)
    assert store_array_files(tmp_path / "a") == store_array_files(tmp_path / "b")


def _dump_cmd(tiny, teacher, out):
    return [sys.executable, str(ROOT / "cli.py"), "dump-teacher", "--teacher", str(teacher), "--images",
            str(tiny["images"]), "--ann", str(tiny["ann"]), "--out", str(out), "--img-scale", "384,384",
            "--workers", "0", "--batch-size", "1", "--shard-mb", "0.05"]


def _shards_done(out: Path) -> int:
    progress = out / "progress" / "c"
    return len(list(progress.iterdir())) if progress.exists() else 0


def _run_and_kill(cmd, out: Path, when_done: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if (when_done == 0 and (out / "zarr.json").exists()) or (when_done and _shards_done(out) >= when_done):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    return proc.returncode


def test_resume_after_sigkill_gives_the_same_bytes(tiny_coco, tiny_teacher, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_dump_cmd(tiny_coco, tiny_teacher["path"], reference), check=True, env=env, capture_output=True)
    total = len(list((reference / "progress" / "c").iterdir()))
    assert total >= 6  # enough shards to stop in the middle
    out = tmp_path / "killed"
    # Killed right after the store appeared, after one shard, and half-way through.
    kills = [_run_and_kill(_dump_cmd(tiny_coco, tiny_teacher["path"], out), out, n) for n in (0, 1, total // 2)]
    assert -signal.SIGKILL in kills  # at least one run really died mid-dump
    assert _shards_done(out) < total
    resumed = subprocess.run(_dump_cmd(tiny_coco, tiny_teacher["path"], out), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert store_array_files(out) == store_array_files(reference)  # byte-identical to the uninterrupted dump
    attrs = lambda p: {k: v for k, v in json.loads((p / "zarr.json").read_text())["attributes"]["ldcache"].items()  # noqa: E731
                       if k != "created"}
    assert attrs(out) == attrs(reference) and attrs(out)["complete"]


def test_teacher_nan_stops_the_dump_naming_the_view(tiny_coco, tmp_path):
    torch.manual_seed(2)
    config = ModelConfig(num_classes=5, **TINY_MODEL)
    model = build_detector(config)
    with torch.no_grad():
        model.bbox_head.gfl_reg.bias.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", model, config)
    with pytest.raises(UserError, match=r"NaN or inf logits on image \d+ \((orig|hflip) view"):
        run_dump(_cfg(tiny_coco, tmp_path / "nan.pt", tmp_path / "c"), progress=False)


def tiny_teacher_path(tmp_path):
    config = ModelConfig(num_classes=5, **TINY_MODEL)
    save_checkpoint(tmp_path / "five.pt", build_detector(config), config)
    return tmp_path / "five.pt"


def test_bad_input(tiny_coco, tmp_path):
    torch.manual_seed(3)
    config = ModelConfig(num_classes=7, **TINY_MODEL)
    save_checkpoint(tmp_path / "seven.pt", build_detector(config), config)
    with pytest.raises(UserError, match="teacher predicts 7 classes"):
        run_dump(_cfg(tiny_coco, tmp_path / "seven.pt", tmp_path / "c"), progress=False)
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(UserError, match="not a writable folder"):
        run_dump(_cfg(tiny_coco, tiny_teacher_path(tmp_path), tmp_path / "a_file" / "c"), progress=False)


def test_reader_in_forked_loader_workers(tiny_coco, tiny_teacher, tmp_path):
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], tmp_path / "c"), progress=False)
    cache = CacheReader(tmp_path / "c")
    expected = [cache.read_view(v).box for v in range(len(cache.records))]  # the parent reads first

    class Views(torch.utils.data.Dataset):
        def __len__(self):
            return len(cache.records)

        def __getitem__(self, v):
            return cache.read_view(v).box

    loader = torch.utils.data.DataLoader(Views(), batch_size=None, num_workers=2)
    got = list(loader)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_folder_of_other_files_is_never_replaced(tiny_coco, tiny_teacher, tmp_path):
    folder = tmp_path / "results"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    for overwrite in (False, True):  # --overwrite replaces a Zarr store, never a folder of other files
        with pytest.raises(UserError, match="holds files that are not a Zarr store.*another --out"):
            run_dump(_cfg(tiny_coco, tiny_teacher["path"], folder, overwrite=overwrite), progress=False)
    assert (folder / "notes.txt").read_text() == "precious" and (folder / "sub").is_dir()
    array = tmp_path / "array.zarr"  # a Zarr store that is no group: refused, replaced only with --overwrite
    zarr.create_array(str(array), shape=(3,), dtype="int32")
    with pytest.raises(UserError, match="not an ldcache cache.*--overwrite"):
        run_dump(_cfg(tiny_coco, tiny_teacher["path"], array), progress=False)
    assert zarr.open_array(str(array), mode="r").shape == (3,)
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], array, overwrite=True), progress=False)
    assert CacheReader(array).complete


class _Killed(BaseException):
    pass


def test_a_dump_killed_while_writing_the_view_table_is_created_again(tiny_coco, tiny_teacher, tmp_path, monkeypatch):
    import cache_teacher.writer as writer

    table = writer.view_table

    def killed_half_way(layout):
        items = list(table(layout).items())

        class Table(dict):
            def items(self):
                yield from items[:3]
                raise _Killed  # SIGKILL after three arrays of the view table were stored

        return Table(items)

    out = tmp_path / "c"
    monkeypatch.setattr(writer, "view_table", killed_half_way)
    with pytest.raises(_Killed):
        run_dump(_cfg(tiny_coco, tiny_teacher["path"], out), progress=False)
    monkeypatch.setattr(writer, "view_table", table)
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], out), progress=False)  # the same command again
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], tmp_path / "reference"), progress=False)
    cache = CacheReader(out)  # the whole view table is there
    assert cache.complete and len(cache.records) == 20
    assert store_array_files(out) == store_array_files(tmp_path / "reference")


def test_a_read_only_store_is_not_written_and_a_failed_write_is_one_line(tiny_coco, tiny_teacher, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "c"
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], out), progress=False)
    before = store_array_files(out)

    async def refused(self, key, value):
        raise PermissionError(13, "Permission denied", str(self.root / key))

    with monkeypatch.context() as patch:  # a read-only location (a shared cache): every store write is refused
        patch.setattr(zarr.storage.LocalStore, "set", refused)
        result = run_dump(_cfg(tiny_coco, tiny_teacher["path"], out), progress=False)
    assert result["already_complete"] and CacheReader(out).complete  # a complete cache needs no write
    group = zarr.open_group(str(out), mode="r+")
    group["progress"][1] = 0
    group.attrs["ldcache"] = {**group.attrs["ldcache"], "complete": False}
    with monkeypatch.context() as patch:
        patch.setattr(zarr.storage.LocalStore, "set", refused)
        with pytest.raises(UserError, match="cannot write .*Permission denied.*run the same command again"):
            run_dump(_cfg(tiny_coco, tiny_teacher["path"], out), progress=False)
    others = lambda files: {k: v for k, v in files.items() if k != "progress/c/1"}  # noqa: E731
    assert others(store_array_files(out)) == others(before)  # nothing else was touched
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], out), progress=False)  # writable again: it resumes
    assert CacheReader(out).complete and store_array_files(out) == before


def test_a_rank_joining_the_store_leaves_the_writes_of_rank_0_alone(tiny_coco, tiny_teacher, tmp_path, monkeypatch):
    """Under torchrun the other ranks open the store after rank 0 created or resumed it, while rank 0
    may already be writing a shard (zarr writes `<key>.<id>.partial`, then renames it)."""
    import cache_teacher.dump as dump
    from core.distributed import DistInfo

    out = tmp_path / "c"
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], out), progress=False)
    in_flight = out / "box" / "c" / "0" / "0.1f2e3d.partial"  # rank 0's shard 0, being written
    in_flight.write_bytes(b"rows")
    monkeypatch.setattr(dump, "init_from_env", lambda device: DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(dump, "run_on_main", lambda fn, info: None)  # rank 0 opened the store
    run_dump(_cfg(tiny_coco, tiny_teacher["path"], out), progress=False)
    assert in_flight.read_bytes() == b"rows"
