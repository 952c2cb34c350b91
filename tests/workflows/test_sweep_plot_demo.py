"""The newcomer path: sweeps over one cache (resumable), plots, and `ldcache demo --quick`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from core.errors import UserError
from tests.cli_runner import run_cli
from tests.conftest import ROOT, TINY_MODEL_FLAGS
from workflows.sweep import parse_grid, point_name


def test_parse_grid_is_a_cartesian_product_of_known_options():
    points = parse_grid(["ld_temperature=5,10", "--vlr-gamma=0,0.25,0.5"])
    assert len(points) == 6 and points[0] == {"ld_temperature": "5", "vlr_gamma": "0"}
    assert point_name(points[-1]) == "ld_temperature=10__vlr_gamma=0.5"
    with pytest.raises(UserError, match="not a train-student option"):
        parse_grid(["learning_rate=1"])
    with pytest.raises(UserError, match="name=v1,v2"):
        parse_grid(["ld_weight"])


def test_grid_values_that_hold_commas_are_separated_by_semicolons():
    assert parse_grid(["lr_steps=8,11;10,14"]) == [{"lr_steps": "8,11"}, {"lr_steps": "10,14"}]
    assert parse_grid(["views=orig;orig,hflip", "img_scale=320x320"]) == [
        {"views": "orig", "img_scale": "320,320"}, {"views": "orig,hflip", "img_scale": "320,320"}]
    assert parse_grid(["lr_steps=8,11"]) == [{"lr_steps": "8"}, {"lr_steps": "11"}]  # commas alone: two values
    assert point_name({"lr_steps": "8,11"}) == "lr_steps=8x11"


def test_a_sweep_compares_ld_and_bckd_from_one_cache():
    """--grid recipe=paper,bckd: one student per method, each point a train-student of that recipe."""
    from workflows.sweep import point_command

    points = parse_grid(["recipe=paper,bckd", "bckd_box_weight=2,4"])
    assert [p["recipe"] for p in points] == ["paper", "paper", "bckd", "bckd"]
    cmd, _ = point_command(["python", "cli.py", "train-student", "--cache", "C"], points[3], Path("r"), None, 1)
    assert cmd[cmd.index("--recipe") + 1] == "bckd" and cmd[cmd.index("--bckd-box-weight") + 1] == "4"
    with pytest.raises(UserError, match="recipe=ld2"):
        parse_grid(["recipe=ld2"])


def test_an_on_off_grid_value_launches_the_flag_train_student_takes():
    """A grid point of a boolean option becomes --name or --no-name (train-student's on/off
    flags take no value), parsed here by train-student's own command line."""
    import typer

    import cli
    from workflows.sweep import point_command

    student = typer.main.get_command(cli.app).commands["train-student"]
    points = parse_grid(["weight_sum_clamp=false,true", "tensorboard=off", "ld_weight=0.5"])
    assert len(points) == 2
    for point in points:
        cmd, _ = point_command(["python", "cli.py", "train-student", "--cache", "C"], point, Path("r"), None, 1)
        assert ("--no-weight-sum-clamp" in cmd) == (point["weight_sum_clamp"] == "false")
        params = student.make_context("train-student", cmd[3:]).params
        assert params["weight_sum_clamp"] is (point["weight_sum_clamp"] == "true")
        assert params["tensorboard"] is False and params["ld_weight"] == 0.5
    with pytest.raises(UserError, match="must be true or false"):
        parse_grid(["norm_eval=maybe"])
    with pytest.raises(UserError, match="ld_weight=-1"):
        parse_grid(["ld_weight=1,-1"])  # checked when the sweep starts, not when the point runs


def _sweep_cmd(tiny, cache, out):
    return [sys.executable, str(ROOT / "cli.py"), "sweep", "--cache", str(cache), "--grid", "ld_temperature=5,10",
            "--grid", "vlr_gamma=0,0.5", "--out", str(out), "--images", str(tiny["images"]), "--ann", str(tiny["ann"]),
            "--val-images", str(tiny["val_images"]), "--val-ann", str(tiny["val_ann"]), "--workers", "0",
            *TINY_MODEL_FLAGS, "--batch-size", "4", "--epochs", "2", "--checkpoint-every", "1", "--log-every", "1"]


def test_sweep_of_four_points_resumes_after_a_kill(tiny_coco, tiny_cache, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_sweep_cmd(tiny_coco, tiny_cache, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    first = out / "ld_temperature=5__vlr_gamma=0" / "checkpoints" / "last.pt"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline and not first.exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the training it runs
    proc.wait()
    assert not (out / "sweep.json").exists()  # it really died mid-sweep
    done = subprocess.run(_sweep_cmd(tiny_coco, tiny_cache, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "sweep.json").read_text())
    assert len(report["points"]) == 4 and all(p["metrics"] is not None for p in report["points"])
    killed = [json.loads(line) for line in (first.parent.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in killed if "loss" in r] == [1, 2, 3, 4, 5, 6]  # resumed, nothing twice
    for p in report["points"]:  # every point read the cache: distillation terms were logged
        records = [json.loads(line) for line in open(os.path.join(p["run_dir"], "metrics.jsonl"))]
        assert all("loss_ld" in r for r in records if "loss" in r)
    assert "| ld_temperature | vlr_gamma | AP |" in (out / "sweep.md").read_text()
    with Image.open(out / "sweep.png") as img:
        assert img.width > 400
    again = subprocess.run(_sweep_cmd(tiny_coco, tiny_cache, out), env=env, capture_output=True, text=True)
    # Finished points are not rerun.
    assert again.returncode == 0 and sum(line.strip().startswith("skipped") for line in again.stdout.splitlines()) == 4


def test_plot_runs(tiny_coco, tiny_cache, tmp_path):
    args = ["--images", tiny_coco["images"], "--ann", tiny_coco["ann"], "--val-images", tiny_coco["val_images"],
            "--val-ann", tiny_coco["val_ann"], "--workers", "0", *TINY_MODEL_FLAGS, "--batch-size", "4",
            "--epochs", "2", "--eval-every", "1", "--log-every", "1"]
    assert run_cli("train-detector", "--out", tmp_path / "plain", "--img-scale", "96,96", *args).returncode == 0
    assert run_cli("train-student", "--cache", tiny_cache, "--out", tmp_path / "ld", *args).returncode == 0
    proc = run_cli("plot", tmp_path / "plain", tmp_path / "ld", "--out", tmp_path / "curves.png")
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "curves.png") as img:
        assert img.width > 1000  # three panels: loss, distillation terms, AP


def test_quick_demo_end_to_end_and_reuse(tmp_path):
    proc = run_cli("demo", "--quick", "--workdir", tmp_path / "demo", "--workers", "0", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("| model |"):]
    assert table.count("| student") == 3 and "| teacher" in table and "BCKD from the same cache" in table
    for artefact in ("data/annotations/instances_train.json", "teacher/eval.json", "teacher-cache.zarr/zarr.json",
                     "cache-view.png", "student-plain/eval.json", "student-ld/eval.json", "student-bckd/eval.json",
                     "demo.md", "demo.json"):
        assert (tmp_path / "demo" / artefact).exists(), artefact
    config = json.loads((tmp_path / "demo" / "student-bckd" / "config.json").read_text())
    assert config["loss"]["recipe"] == "bckd" and config["teacher"]["kind"] == "cache"
    again = run_cli("demo", "--quick", "--workdir", tmp_path / "demo", "--workers", "0")
    assert again.returncode == 0 and again.stdout.count("already trained") == 4  # finished steps are reused


def _fake_sweep(tmp_path, **kw):
    from workflows.sweep import run_sweep

    fake = [sys.executable, str(ROOT / "tests" / "workflows" / "fake_train_student.py"), "train-student",
            "--cache", "C"]
    lines = []
    results = run_sweep("C", parse_grid(["ld_weight=0.1,0.2,0.3,0.4,0.5"]), fake, tmp_path / "sweep",
                        on_progress=lines.append, **kw)
    envs = [[json.loads(p.read_text()) for p in sorted(Path(r.run_dir).glob("env-*.json"))] for r in results]
    return results, envs, lines


def test_a_sweep_over_devices_gives_each_point_its_own_device(tmp_path):
    results, envs, lines = _fake_sweep(tmp_path, slots=[("0",), ("1",), ("2",)])
    assert all(r.status == "done" for r in results)
    assert all(e[0]["device"] == "cuda" and e[0]["visible"] in ("0", "1", "2") for e in envs)
    for a in envs:  # two points that ran at the same time saw different devices
        for b in envs:
            if a is not b and a[0]["start"] < b[0]["end"] and b[0]["start"] < a[0]["end"]:
                assert a[0]["visible"] != b[0]["visible"]
    assert any(e[0]["start"] < f[0]["end"] and f[0]["start"] < e[0]["end"] for e in envs for f in envs if e is not f)
    assert lines[-1].startswith("sweep: 5/5 done, 0 running, 0 left") and "ETA" in lines[-2]


def test_a_sweep_with_gpus_per_job_runs_each_point_as_a_torchrun(tmp_path):
    results, envs, _ = _fake_sweep(tmp_path, slots=[("0", "1"), ("2", "3")])
    assert all(r.status == "done" for r in results)
    for env in envs:
        assert [e["world_size"] for e in env] == [2, 2]  # two processes per point
        assert env[0]["visible"] in ("0,1", "2,3") and env[0]["visible"] == env[1]["visible"]


def test_a_cpu_sweep_gets_no_device_and_splits_the_threads(tmp_path):
    results, envs, _ = _fake_sweep(tmp_path, jobs=2)
    assert all(e[0]["visible"] is None and e[0]["device"] is None for e in envs)
    assert {e[0]["threads"] for e in envs} == {str(max(1, (os.cpu_count() or 1) // 2))}


def test_device_slots_from_the_options():
    import torch

    from workflows.sweep import SweepConfig

    assert SweepConfig(cache="C").device_slots() is None  # the CPU
    assert SweepConfig(cache="C", devices="0,1,2,3").device_slots() == [("0",), ("1",), ("2",), ("3",)]
    assert SweepConfig(cache="C", devices="0,1,2,3,4", gpus_per_job=2).device_slots() == [("0", "1"), ("2", "3")]
    if not torch.cuda.is_available():
        assert SweepConfig(cache="C", devices="auto").device_slots() is None  # no GPU: as without --devices
    with pytest.raises(UserError, match="needs at least 4 devices"):
        SweepConfig(cache="C", devices="0,1", gpus_per_job=4).device_slots()


def test_a_value_given_twice_is_one_point():
    """Two points of one value would be two train-student runs of one folder at once (--jobs 2)."""
    points = parse_grid(["ld_weight=0.25,0.25,.25,0.5", "weight_sum_clamp=true,on"])
    assert points == [{"ld_weight": "0.25", "weight_sum_clamp": "true"},
                      {"ld_weight": "0.5", "weight_sum_clamp": "true"}]


def test_a_sweep_run_again_with_other_options_does_not_report_the_old_results(tmp_path):
    """A finished point is skipped only when it finished with the options given now; otherwise
    train-student --resume decides (continue, evaluate again, or refuse the change)."""
    from workflows.sweep import run_sweep

    fake = [sys.executable, str(ROOT / "tests" / "workflows" / "fake_train_student.py"), "train-student",
            "--cache", "C"]
    grid = parse_grid(["ld_weight=0.1,0.2"])
    first = run_sweep("C", grid, [*fake, "--max-iters", "1"], tmp_path / "sweep")
    assert [r.status for r in first] == ["done", "done"]
    assert [r.status for r in run_sweep("C", grid, [*fake, "--max-iters", "1"], tmp_path / "sweep")] == ["skipped"] * 2
    assert [r.status for r in run_sweep("C", grid, fake, tmp_path / "sweep")] == ["done", "done"]  # ran again
    (tmp_path / "sweep" / "ld_weight=0.1" / "sweep_point.json").unlink()  # a sweep folder from before the record
    assert run_sweep("C", grid, fake, tmp_path / "sweep")[0].status == "skipped"


def test_the_demo_refuses_a_work_folder_of_the_other_plan(tmp_path):
    """`ldcache demo --quick` then `ldcache demo` (both runs/demo by default) would reuse the quick
    demo's data, teacher and students and print them as the full demo's."""
    from tests.cli_runner import assert_user_error
    from workflows.demo import PLANS

    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "demo.json").write_text(json.dumps({"plan": PLANS["quick"].__dict__}))  # a finished quick demo
    before = sorted(p.name for p in workdir.iterdir())
    assert_user_error(run_cli("demo", "--workdir", workdir, "--workers", "0"), "the --quick demo", "--workdir")
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing written
