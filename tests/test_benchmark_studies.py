"""The studies behind the docs' comparisons (LD against BCKD, the compact cache's fidelity): their
plans, choices and reports, without the hours of training they stand for."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.harness.ledger import Ledger
from tests.conftest import ROOT


def test_distill_methods_plans_one_dump_per_dataset_and_picks_the_best_combination(tmp_path):
    from benchmarks.studies import distill_methods as dm

    datasets = ["synth", "photos"]
    jobs = dm.plan(tmp_path, datasets, seeds=3, best=None)
    by_name = {j.name: j for j in jobs}
    assert "--pixels" in by_name["photos/data"].argv  # real pixels
    for name in datasets:  # every distilled student of a dataset reads its one dense dump
        students = [j for j in jobs if j.name.startswith(f"{name}/") and j.argv[0] == "train-student"
                    and "-compact" not in j.name]
        assert students and {j.after for j in students} == {(f"{name}/cache",)}
        plain_methods = [j for j in students if j.name.split("/")[1].rsplit("-s", 1)[0] in ("ld", "bckd")]
        assert len(plain_methods) == 6 and not any(a.endswith("-weight") for j in plain_methods for a in j.argv)
    bckd = by_name["synth/bckd-s2"].argv
    assert bckd[bckd.index("--recipe") + 1] == "bckd" and bckd[bckd.index("--seed") + 1] == "2"
    assert "synth/bckd+ld-s1" not in by_name and "synth/bckd+ld-s0" in by_name  # candidates: seed 0 only
    assert by_name["synth/ld-s0-compact"].after == ("synth/cache-compact",) and "synth/ld-s1-compact" not in by_name
    assert by_name["synth/ld-s2-compact4"].after == ("synth/cache-compact4",)  # top-4: every seed
    for cache, k in (("cache-compact", "2"), ("cache-compact4", "4")):
        argv = by_name[f"synth/{cache}"].argv
        assert "ld+bckd" in argv and argv[argv.index("--cls-topk") + 1] == k and f"photos/{cache}" not in by_name

    def finished(name, ap):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "eval.json").write_text(json.dumps({"metrics": {"AP": ap}}))

    for name in datasets:
        finished(f"{name}/teacher", 0.40)
        finished(f"{name}/plain-s0", 0.20)
        for combo, ap in zip(dm.COMBOS, (0.22, 0.30, 0.25)):
            finished(f"{name}/{combo}-s0", ap)
    runs = Ledger(None, tmp_path)  # the work folder's runs alone
    best, gains = dm.choose_combo(runs, datasets)
    assert best == list(dm.COMBOS)[1] and gains[best] == pytest.approx(10.0)
    assert dm.choose_combo(runs, list(dm.DATASETS))[0] is None  # the study's choice waits for every dataset
    assert f"synth/{best}-s2" in {j.name for j in dm.plan(tmp_path, datasets, 3, best)}
    for s, (p, b) in enumerate([(0.20, 0.30), (0.22, 0.34)]):
        finished(f"synth/plain-s{s}", p)
        finished(f"synth/bckd-s{s}", b)
    result = dm.report(tmp_path, runs, jobs, datasets, 3, best, gains)
    synth = result["datasets"]["synth"]
    # the records cover both phases: every combination with every seed, whichever is chosen later
    assert {f"synth/{c}-s2" for c in dm.COMBOS} <= dm.ledger(tmp_path, datasets, 3).commands.keys()
    assert synth["gap_closed"]["bckd"] == pytest.approx((32 - 21) / (40 - 21))  # seed means: 32 and 21
    assert synth["runs"]["bckd"]["aps"] == pytest.approx([30.0, 34.0])


def test_compact_fidelity_compares_every_term_with_the_dense_cache(tiny_coco, tiny_teacher, tmp_path):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_coco["root"], work / "data" / "tiny")
    from detector import build_detector, save_checkpoint

    for run in ("teacher", "plain-s0"):
        (work / "tiny" / run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_teacher["path"], work / "tiny" / "teacher" / "checkpoints" / "last.pt")
    torch.manual_seed(5)  # a student unlike its teacher: BCKD's terms do not vanish
    save_checkpoint(work / "tiny" / "plain-s0" / "checkpoints" / "last.pt", build_detector(tiny_teacher["config"]),
                    tiny_teacher["config"])
    out = tmp_path / "fidelity.json"  # an earlier measurement: another dataset's row stays, tiny's go
    out.write_text(json.dumps({"rows": [{"dataset": "other", "mode": "ld+bckd k=1 fp16"},
                                        {"dataset": "tiny", "mode": "stale"}]}))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.studies.compact_fidelity", "--workdir", str(work),
                           "--views", "4", "--batch-size", "2", "--out", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    every = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in every if r["dataset"] == "other"] == ["ld+bckd k=1 fp16"]
    rows = {r["mode"]: r for r in every if r["dataset"] == "tiny"}
    assert "stale" not in rows and len(rows) == 8 and rows["ld+bckd k=2 fp16"]["teacher_sha256"]
    exact = rows["ld+bckd k=8 fp16"]  # 8 >= the 5 classes: only the edges are rounded
    assert exact["err ld"] == 0 and exact["err kd"] == 0 and exact["err bckd_cls"] == 0
    assert 0 < exact["err bckd_box"] < 0.01
    assert rows["ld+bckd k=1 fp16"]["err bckd_cls"] > 0 and rows["ld+bckd k=1 uint8"]["err ld"] > 0


def test_small_students_share_the_teachers_and_dumps_of_distill_methods(tmp_path):
    from benchmarks.studies import distill_methods as dm
    from benchmarks.studies import small_students as ss

    jobs = ss.plan(tmp_path, ["synth", "large8"], seeds=3)
    theirs = {j.name: j for j in dm.plan(tmp_path, ["synth", "large8"], seeds=3, best=None)}
    for j in jobs:
        if j.argv[0] in ("make-synthetic", "dump-teacher") or j.name.endswith("/teacher"):
            assert theirs[j.name] == j  # the same run in the same folder: done once for both studies
    students = [j for j in jobs if "-s" in j.name]
    assert len(students) == 2 * 2 * 3 * 3  # datasets x backbones x (plain, ld, bckd) x seeds
    by_name = {j.name: j for j in students}
    plain, ld = by_name["large8/mobilenet_v2-plain-s1"], by_name["large8/mobilenet_v2-ld-s1"]
    assert plain.argv[0] == "train-detector" and plain.after == ("large8/data",)
    assert ld.argv[:3] == ["train-student", "--cache", str(tmp_path / "large8" / "cache.zarr")]
    assert ld.after == ("large8/cache",) and ld.argv[ld.argv.index("--seed") + 1] == "1"
    assert "synthetic-mobilenet-student.toml" in " ".join(ld.argv)
    assert "synthetic-shufflenet-student.toml" in " ".join(by_name["synth/shufflenet_v2_x1_0-bckd-s2"].argv)
    assert not any(a.endswith("-weight") for j in students for a in j.argv)  # the recipes' own weights

    def finished(name, ap):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "eval.json").write_text(json.dumps({"metrics": {"AP": ap}}))

    finished("synth/teacher", 0.30)
    for s, (p, b) in enumerate([(0.10, 0.20), (0.12, 0.22)]):
        finished(f"synth/shufflenet_v2_x1_0-plain-s{s}", p)
        finished(f"synth/shufflenet_v2_x1_0-bckd-s{s}", b)
    result = ss.report(Ledger(None, tmp_path), jobs, ["synth", "large8"], 3)
    cell = result["datasets"]["synth"]["shufflenet_v2_x1_0"]
    assert cell["gap_closed"]["bckd"] == pytest.approx((21 - 11) / (30 - 11))
    assert cell["gap_closed"]["ld"] is None and result["datasets"]["large8"]["teacher"] is None
    finished("synth/shufflenet_v2_x1_0-bckd-s2", 0.05)  # a seed whose plain run has not finished: no difference
    cell = ss.report(Ledger(None, tmp_path), jobs, ["synth"], 3)["datasets"]["synth"]["shufflenet_v2_x1_0"]
    assert cell["over_plain_by_seed"]["bckd"] == pytest.approx([10.0, 10.0, None])
    row = next(line for line in ss.report(Ledger(None, tmp_path), jobs, ["synth"], 3)["table"].splitlines()
               if "shufflenet" in line)
    assert "| 11.0 +- 1.4 (2) |" in row and row.endswith("| -/-/- | +10.0/+10.0/- |"), row
