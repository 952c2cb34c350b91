"""Every benchmark script runs end to end at a tiny size and writes a result JSON whose rows hold
positive, finite measurements: the scripts call the same APIs as the product, so a change that
breaks them must fail here rather than at the next benchmark run."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

TINY_TEACHER = ["--depth", "18", "--base-width", "8", "--fpn-channels", "64", "--head-channels", "64",
                "--stacked-convs", "1"]
TINY_STUDENT = ["--student-depth", "18", "--student-base-width", "8", "--student-fpn-channels", "64",
                "--student-head-channels", "64", "--student-stacked-convs", "1"]

CASES = {
    "dump_throughput": (["--repeats", "1", "--batch-size", "4", "--workers", "0"], "views_per_s"),
    "cache_size_fidelity": (["--batch-size", "4", "--workers", "0"], "kb_per_view"),
    "read_throughput": (["--seconds", "0.2", "--repeats", "1", "--workers-list", "0,2", "--dump-workers", "0"],
                        "views_per_s"),
    "train_throughput": ([*TINY_STUDENT, "--batch-size", "2", "--workers", "0", "--steps", "2", "--warmup", "1",
                          "--rounds", "1"], "steps_per_s"),
    "scaleout": (["--seconds", "0.2", "--repeats", "1", "--batch-size", "4"], "views_per_s"),
}


def _numbers(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if isinstance(row.get(key), (int, float))]


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_and_writes_results(script, tiny_coco, tmp_path):
    extra, key = CASES[script]
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, "-m", f"benchmarks.suite.{script}", "--images", str(tiny_coco["images"]),
           "--ann", str(tiny_coco["ann"]), "--num-images", "6", "--img-scale", "96,96", *TINY_TEACHER, *extra,
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["script"].endswith(f"{script}.py") or script in record["script"]
    assert record["command"].split()[1:3] == ["-m", f"benchmarks.suite.{script}"]  # how to run it again
    values = _numbers(record["rows"], key)
    assert values, f"no {key!r} in the rows of {script}: {record['rows']}"
    assert all(math.isfinite(v) and v > 0 for v in values), values
    assert "|" in proc.stdout  # the markdown table
    if script == "scaleout":  # a 2-process dump is byte-identical to a 1-process one with the same kernels
        assert any("bytes identical" in row.get("note", "") for row in record["rows"]), record["rows"]


def test_coco_geometry_measures_every_mode(tmp_path):
    out = tmp_path / "coco_geometry.json"
    cmd = [sys.executable, "-m", "benchmarks.suite.coco_geometry", "--num-images", "2", "--img-scale", "160,128",
           "--teacher-width", "16", "--batch-size", "2", "--workers", "0", "--read-workers", "0", "--read-seconds",
           "0.2", "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    size = {r["mode"]: r["kb_per_view"] for r in record["rows"]}
    assert size["sparse 0.25 uint8"] < size["sparse 0.25 fp16"] < size["sparse 0 fp16"] < size["dense fp16"]
    assert size["dense uint8"] < size["dense fp16"]
    assert all(r["kl_mean"] < 1e-3 for r in record["rows"])  # every mode stores faithful distributions
    assert set(record["dumps"]) == {"dense fp16", "sparse 0.25 uint8", "ld+bckd k=4 fp16"}
    # ld+bckd: the sparse mode's box rows (without their 80 class logits) plus 10 + 3k bytes at every location
    assert size["ld+bckd k=1 fp16"] < size["ld+bckd k=2 fp16"] < size["ld+bckd k=4 fp16"] < size["dense fp16"]
    assert size["ld+bckd k=2 uint8"] < size["ld+bckd k=2 fp16"]
    assert record["box_logit_factor"] > 10  # a random head's box logits are nearly flat until spread out


def test_sparse_size_counts_fewer_rows_than_dense(tiny_coco, tmp_path):
    out = tmp_path / "sparse.json"
    cmd = [sys.executable, "-m", "benchmarks.suite.sparse_size", "--images", str(tiny_coco["images"]),
           "--ann", str(tiny_coco["ann"]), "--img-scale", "96,96", "--min-vlr-gamma", "0.5", "0.0",
           "--workers", "0", "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["min_vlr_gamma"]: row for row in json.loads(out.read_text())["rows"]}
    assert 0 < rows[0.5]["fraction"] < rows[0.0]["fraction"] < 1  # a wider VLR band keeps more rows


def test_ld_density_counts_positives_and_vlr_weight(tiny_coco, tmp_path):
    out = tmp_path / "density.json"
    cmd = [sys.executable, "-m", "benchmarks.suite.ld_density", "--coco-like", "20", "--no-synthetic-default",
           "--dataset", f"tiny={tiny_coco['ann']}:{tiny_coco['images']}:96", "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    coco, tiny = json.loads(out.read_text())["rows"]
    assert coco["classes"] == 80 and tiny["classes"] == 5 and coco["positives_vs_first"] == 1.0
    # ATSS keeps several positives per object (top-9 per level, then the IoU threshold) and the VLR band
    # around every object holds more weight than its positives
    assert coco["positives_per_image"] > 2 * coco["objects_per_image"] and coco["vlr_weight_per_image"] > 0
    assert tiny["positives_vs_first"] == pytest.approx(tiny["positives_per_image"] / coco["positives_per_image"])
    # COCO's boxes at 1333x800 spread over the bins (the paper's temperature applies)
    assert 2.5 < coco["median_edge_bins"] < 5 and coco["ld_temperature"] == 10.0


def test_coco_like_annotations_follow_the_published_statistics(tmp_path):
    from benchmarks.harness import coco_like

    data = json.loads(coco_like.write_coco_like(400, tmp_path / "ann.json", seed=0).read_text())
    boxes = [a["bbox"] for a in data["annotations"]]
    assert len(data["images"]) == 400 and len(data["categories"]) == 80
    assert 6.0 < len(boxes) / 400 < 8.6  # 7.3 objects per image on average
    areas = [w * h for _, _, w, h in boxes]
    small = sum(a < 32 ** 2 for a in areas) / len(areas)
    large = sum(a > 96 ** 2 for a in areas) / len(areas)
    assert 0.33 < small < 0.5 and 0.17 < large < 0.31  # 41% small, 24% large (clipping shifts a little)
    size_of = {i["id"]: (i["width"], i["height"]) for i in data["images"]}
    assert set(size_of.values()) <= {(640, 480), (480, 640)}
    for a in data["annotations"]:  # every box inside its image
        x, y, w, h = a["bbox"]
        iw, ih = size_of[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= iw + 0.01 and y + h <= ih + 0.01


def test_ld_defaults_plans_user_commands_and_reports_the_gap_closed(tmp_path):
    from benchmarks.studies import ld_defaults

    jobs = ld_defaults.plan(tmp_path, seeds=3, batches=[2, 8])
    by_name = {j.name: j for j in jobs}
    ld = by_name["synth/ld-b8-s0"]
    assert ld.argv[:3] == ["train-student", "--cache", str(tmp_path / "synth" / "cache.zarr")]
    assert not any(a.endswith("-weight") for a in ld.argv)  # the defaults: no weight flags
    assert ld.after == ("synth/cache",) and by_name["synth/cache"].after == ("synth/teacher",)
    b2 = by_name["synth/ld-b2-s0"].argv
    assert b2[b2.index("--lr") + 1] == "0.00025"  # lr scaled linearly from 0.001 at batch 8
    assert jobs[0].name.endswith("/data")  # what others wait on starts first

    def finished(name, ap):
        run = tmp_path / name
        run.mkdir(parents=True, exist_ok=True)
        (run / "eval.json").write_text(json.dumps({"metrics": {"AP": ap, "AP50": ap, "AP75": ap}}))

    for name, ap in [("synth/teacher", 0.40), ("synth/plain-b8-s0", 0.20), ("synth/ld-b8-s0", 0.25),
                     ("synth/plain-b8-s1", 0.22), ("synth/ld-b8-s1", 0.26)]:
        finished(name, ap)
    result = ld_defaults.report(tmp_path, jobs, seeds=3, batches=[2, 8])
    synth = next(r for r in result["datasets"] if r["dataset"] == "synth")
    assert synth["gap_closed"] == pytest.approx((25.5 - 21) / (40 - 21))  # seed means: LD 25.5, plain 21
    assert result["seeds"]["ld"]["aps"] == pytest.approx([25.0, 26.0]) and result["seeds"]["plain"]["sd"] > 0
    assert "| 8 | 20.0 | 25.0 | 5.0 |" in result["table"]
    # Small objects: the default (no temperature flag) beside the paper's T = 10 over the same seeds.
    assert "--ld-temperature" not in by_name["dense1/ld-b8-s2"].argv
    t10 = by_name["dense1/ld-b8-s2-T10"].argv
    assert t10[t10.index("--ld-temperature") + 1] == "10" and t10[t10.index("--seed") + 1] == "2"
    for s, (p, d, t) in enumerate([(0.24, 0.26, 0.24), (0.25, 0.27, 0.25)]):
        for name, ap in ((f"plain-b8-s{s}", p), (f"ld-b8-s{s}", d), (f"ld-b8-s{s}-T10", t)):
            finished(f"dense1/{name}", ap)
    (tmp_path / "dense1" / "ld-b8-s0" / "config.json").write_text(
        json.dumps({"median_edge_bins": 0.84, "loss": {"ld_temperature": 1.0}}))
    cells = ld_defaults.report(tmp_path, jobs, seeds=3, batches=[2, 8])["temperature"]["dense1"]
    assert cells["median_edge_bins"] == 0.84 and cells["default_temperature"] == 1
    assert cells["T1"]["mean"] == pytest.approx(26.5)  # the default run is the T = 1 column here
    assert cells["T10"]["aps"] == pytest.approx([24.0, 25.0]) and cells["plain"]["sd"] > 0
    # where the default is the paper's 10, the default run is the T = 10 column and the variant T = 1
    (tmp_path / "synth" / "ld-b8-s0" / "config.json").write_text(
        json.dumps({"median_edge_bins": 2.7, "loss": {"ld_temperature": 10.0}}))
    finished("synth/ld-b8-s0-T1", 0.21)
    cells = ld_defaults.report(tmp_path, jobs, seeds=3, batches=[2, 8])["temperature"]["synth"]
    assert cells["T10"]["aps"] == pytest.approx([25.0, 26.0]) and cells["T1"]["aps"] == pytest.approx([21.0])


def test_gap_decomposition_swaps_scores_and_boxes_location_by_location(tiny_coco, tmp_path):
    """Each model alone detects what `evaluate` detects; a swap between a model and itself changes
    nothing; a swap between two models gives detections of neither."""
    from benchmarks.harness import gap
    from data.coco import CocoDetection
    from data.views import ViewSpec
    from detector import ModelConfig, build_detector, save_checkpoint
    from detector.inference import predict_dataset
    from tests.conftest import TINY_MODEL

    paths, models = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = ModelConfig(num_classes=5, **TINY_MODEL)
        models.append(build_detector(config).eval())
        torch.nn.init.zeros_(models[-1].bbox_head.gfl_cls.bias)  # scores near 0.5: detections everywhere
        paths.append(tmp_path / f"model{seed}.pt")
        save_checkpoint(paths[-1], models[-1], config)
    data = (str(tiny_coco["val_images"]), str(tiny_coco["val_ann"]), (96, 96))
    _, pair = gap.predictions(str(paths[0]), str(paths[1]), *data)
    _, same = gap.predictions(str(paths[0]), str(paths[0]), *data)
    dataset = CocoDetection(data[0], data[1], views=[ViewSpec(False, data[2])], strides=config.strides, train=False)
    for name, model in (("teacher", models[0]), ("student", models[1])):
        alone = predict_dataset(model, dataset, torch.device("cpu"), batch_size=8, progress=False)
        assert len(alone) > 0 and pair[name] == alone
    assert all(r == same["teacher"] for r in same.values())
    for name in ("student scores + teacher boxes", "teacher scores + student boxes"):
        assert pair[name] != pair["student"] and pair[name] != pair["teacher"]


def test_step_phases_times_every_phase_of_both_variants(tmp_path):
    out = tmp_path / "phases.json"
    cmd = [sys.executable, "-m", "benchmarks.suite.step_phases", "--label", "t",
           "--img-scale", "64,64", "--batch-size", "1", "--threads", "1", "--steps", "1", "--warmup", "0",
           "--rounds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["phase"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"step", "teacher rows", "forward", "assignment", "gfl_losses", "distillation", "backward",
                         "optimizer", "rest"}
    assert rows["distillation"]["plain"] == 0 < rows["distillation"]["cache"]  # only the cache variant distils
    for variant in ("plain", "cache"):  # the phases are parts of the step
        assert rows["forward"][variant] > 0 and rows["backward"][variant] > 0
        assert sum(r[variant] for k, r in rows.items() if k not in ("step", "rest")) <= rows["step"][variant] * 1.001


def test_deploy_latency_times_the_three_runtimes_on_the_same_exported_model(tmp_path):
    out = tmp_path / "deploy.json"
    cmd = [sys.executable, "-m", "benchmarks.suite.deploy_latency", "--backbones", "shufflenet_v2_x1_0",
           "--heads", "light", "--sizes", "64,96", "--reps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["backbone"], r["size"]) for r in rows] == [("shufflenet_v2_x1_0", 64), ("shufflenet_v2_x1_0", 96)]
    for r in rows:
        assert min(r["network_ms"], r["eager_ms"], r["torchscript_ms"], r["onnxruntime_ms"]) > 0
        assert r["detections"] > 0  # NMS had candidates to work on
    assert rows[0]["backbone_params_m"] == pytest.approx(0.776, abs=0.01)  # torchvision's x1.0 without conv5, fc
    assert rows[1]["gflops"] == pytest.approx(rows[0]["gflops"] * 96**2 / 64**2, rel=0.05)  # FLOPs follow the area
    assert "| shufflenet_v2_x1_0 | light | 64 |" in proc.stdout  # the table, for run_all's summary


def test_vs_mmdetection_worker_builds_one_variant_and_answers_time_and_profile():
    """Our side of vs_mmdetection: a worker that builds variants on command, times their steps and
    profiles them (mmdetection's side needs its own venv and is not run here)."""
    cmd = [sys.executable, "-m", "benchmarks.suite.vs_mmdetection", "--serve", "--img-scale", "64,64",
           "--batch-size", "1", "--threads", "1"]
    commands = [{"build": "ours_cache"}, {"build": "ours_plain"}, {"time": "ours_cache", "steps": 2, "warmup": 1},
                {"profile": "ours_cache", "steps": 1}, {"profile": "ours_plain", "steps": 1}]
    proc = subprocess.run(cmd, input="".join(json.dumps(c) + "\n" for c in commands), capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built, _, timed, cache, plain = (json.loads(line) for line in proc.stdout.splitlines())  # answers only
    assert built["built"] == "ours_cache" and built["seconds"] > 0
    assert len(timed["ms_per_step"]) == 2 and all(t > 0 for t in timed["ms_per_step"])
    assert timed["minflt_per_step"] >= 0
    cache, plain = cache["ops"], plain["ops"]
    assert cache["aten::convolution_backward"][1] > 0  # a training step: the student's backward ran
    assert not {"forward", "distillation"} & set(cache)  # operators only, not our profiler ranges
    # the cached rows' distillation terms: KLs over softmaxes that a plain step does not compute
    assert cache["aten::_log_softmax"][1] > plain.get("aten::_log_softmax", [0, 0])[1]


def test_op_differences_rank_operators_by_absolute_difference():
    from benchmarks.suite.vs_mmdetection import op_differences

    ours = {"conv": [10.0, 5], "relu": [1.0, 3], "ours_only": [2.5, 1]}
    theirs = {"conv": [13.0, 5], "relu": [1.5, 3], "theirs_only": [0.25, 2]}
    rows = op_differences(ours, theirs, top=3)
    assert [r["op"] for r in rows] == ["conv", "ours_only", "relu"]
    assert rows[0]["diff_ms"] == -3.0 and rows[1]["theirs_ms"] == 0.0 and rows[1]["theirs_calls"] == 0.0


def test_vs_mmdetection_verdict_tells_a_met_goal_from_noise():
    from benchmarks.suite.vs_mmdetection import verdict

    assert verdict([0.95, 0.97, 0.98, 1.0, 1.02], 1.0) == "met"  # a time ratio: median at most the goal
    assert verdict([0.96, 0.99, 1.01, 1.02, 1.03], 1.0) == "within noise"  # the goal inside the quartiles
    assert verdict([0.95, 1.02, 1.03, 1.05, 1.09], 1.0) == "NOT met"  # one low round does not make it noise
    assert verdict([0.93, 0.96, 0.97], 0.95, at_least=True) == "met"  # a steps/s ratio: median at least the goal
    assert verdict([0.85, 0.90, 0.93], 0.95, at_least=True) == "NOT met"
    assert verdict([0.90, 0.93, 0.94, 0.96, 0.97], 0.95, at_least=True) == "within noise"


def test_run_all_echoes_each_table_and_writes_where_it_is_told(tmp_path, monkeypatch, capsys):
    from benchmarks import run_all

    (tmp_path / "fake.py").write_text(
        "import json, sys\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "print('progress', file=sys.stderr)\n"
        "print('| a | b |')\n"
        "json.dump({'environment': {'device_name': 'cpu', 'torch': 'x'}, 'rows': []}, open(out, 'w'))\n")
    monkeypatch.setattr(run_all, "script_command", lambda name: [sys.executable, str(tmp_path / f"{name}.py")])
    monkeypatch.setattr(run_all, "plan", lambda args: [("fake", ["--flag"])])
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--results-dir", str(tmp_path / "res")])
    run_all.main()
    assert "| a | b |" in capsys.readouterr().out  # echoed as the script printed it
    section = (tmp_path / "res" / "fake.section.md").read_text()
    assert "| a | b |" in section and "--flag" in section and "device: cpu" in section
    assert "| a | b |" in (tmp_path / "res" / "SUMMARY.md").read_text()
