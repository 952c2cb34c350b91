"""The studies' ledger (benchmarks/harness/ledger.py) and the queue's use of it: a recorded run is
not redone, a run that must be rebuilt as another's input has to reproduce its record, and reports
read records where the work folder has no run."""

import json

import pytest
import torch

from benchmarks.harness import command_queue
from benchmarks.harness.command_queue import Job, to_run
from benchmarks.harness.ledger import Ledger, weights_sha256


def _finish(job: Job, ap: float, weight: float) -> None:
    """Make job's output look like a finished training run."""
    (job.out / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.full((3,), weight)}, "optimizer": {"step": 1}},
               job.out / "checkpoints" / "last.pt")
    (job.out / "eval.json").write_text(json.dumps({"metrics": {"AP": ap, "AP50": 2 * ap}}))


def _plan(work):
    teacher = Job("d/teacher", ["train-detector", "--out", str(work / "d" / "teacher")], work / "d" / "teacher")
    students = [Job(f"d/s{i}", ["train-student", "--teacher-ckpt", str(work / "d" / "teacher" / "x.pt"),
                                "--seed", str(i), "--out", str(work / "d" / f"s{i}")], work / "d" / f"s{i}",
                    ("d/teacher",)) for i in range(2)]
    return [teacher, *students]


def test_weights_digest_depends_on_the_weights_only(tmp_path):
    job = Job("x", ["train-detector"], tmp_path / "x")
    _finish(job, 0.1, 1.0)
    a = weights_sha256(job.out / "checkpoints" / "last.pt")
    torch.save({"state_dict": {"w": torch.full((3,), 1.0)}, "optimizer": {"step": 99}},
               job.out / "checkpoints" / "last.pt")
    assert weights_sha256(job.out / "checkpoints" / "last.pt") == a
    _finish(job, 0.1, 1.0 + 2**-20)
    assert weights_sha256(job.out / "checkpoints" / "last.pt") != a


def test_records_serve_another_work_folder_and_skip_what_is_recorded(tmp_path):
    root, first = tmp_path / "ledger", tmp_path / "machine1"
    jobs = _plan(first)
    runs = Ledger("study", first, jobs, root=root)
    for job, ap in zip(jobs, (0.4, 0.2, 0.3)):
        _finish(job, ap, ap)
        assert runs.record(job, 12.0, 1)[0]
    rec = json.loads((root / "study" / "d" / "s1.json").read_text())
    assert rec["command"][2] == "$WORK/d/teacher/x.pt" and rec["metrics"]["AP"] == 0.3 and rec["wall_s"] == 12.0

    second = tmp_path / "machine2"  # a fresh machine: nothing in its work folder
    jobs2 = _plan(second)
    runs2 = Ledger("study", second, jobs2, root=root)
    assert to_run(jobs2, runs2) == []
    assert runs2.ap("d/s1") == pytest.approx(30.0) and runs2.ap("d/teacher") == pytest.approx(40.0)
    assert runs2.seed_stats("d/s{}", 2)["mean"] == pytest.approx(25.0)
    assert to_run(jobs2, Ledger(None, second, jobs2)) == jobs2  # without records everything runs

    # A new student: its teacher is recorded but not here, so it is rebuilt too; the other student is not.
    jobs3 = [*jobs2, Job("d/s2", ["train-student", "--seed", "2"], second / "d" / "s2", ("d/teacher",))]
    runs3 = Ledger("study", second, jobs3, root=root)
    assert [j.name for j in to_run(jobs3, runs3)] == ["d/teacher", "d/s2"]

    # A changed command is a different run: its old record is not read.
    jobs4 = _plan(second)
    jobs4[1].argv.append("--amp")
    runs4 = Ledger("study", second, jobs4, root=root)
    assert runs4.ap("d/s0") is None and [j.name for j in to_run(jobs4, runs4)] == ["d/teacher", "d/s0"]


def test_a_rebuilt_input_must_reproduce_its_record(tmp_path):
    root = tmp_path / "ledger"
    teacher = _plan(tmp_path / "a")[0]
    _finish(teacher, 0.4, 0.4)
    ok, note = Ledger("study", tmp_path / "a", [teacher], root=root).record(teacher, 1.0, 1)
    assert ok and note.startswith("recorded") and note.endswith("teacher.json")
    again = _plan(tmp_path / "b")[0]
    runs = Ledger("study", tmp_path / "b", [again], root=root)
    _finish(again, 0.4, 0.4)
    ok, note = runs.record(again, 1.0, 1)
    assert ok and "reproduced" in note
    _finish(again, 0.4, 0.41)
    ok, note = runs.record(again, 1.0, 1)
    assert not ok and "DIFFERS" in note
    assert json.loads((root / "study" / "d" / "teacher.json").read_text())["metrics"]["AP"] == 0.4


def test_the_queue_records_runs_and_a_fresh_work_folder_runs_nothing(tmp_path, monkeypatch):
    """Through the real command: a make-synthetic job is recorded once, run where no GPU is visible
    (records are CPU runs); on a fresh work folder the queue finds it recorded and starts nothing."""
    root, lines, envs, popen = tmp_path / "ledger", [], [], command_queue.subprocess.Popen
    monkeypatch.setattr(command_queue.subprocess, "Popen",
                        lambda *a, **kw: envs.append(kw.get("env")) or popen(*a, **kw))
    make = lambda work: [Job("d/data", ["make-synthetic", str(work / "data"), "--num-train", "2", "--num-val",  # noqa: E731
                                        "1", "--image-size", "64"], work / "data")]
    jobs = make(tmp_path / "w1")
    command_queue.run(jobs, 1, lines.append, 1, Ledger("study", tmp_path / "w1", jobs, root=root))
    assert lines[-1].startswith("done: d/data") and jobs[0].done()
    rec = json.loads((root / "study" / "d" / "data.json").read_text())
    assert rec["train_images"] == 2 and rec["classes"] == 6
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs if e is not None] == [""]  # (git's calls pass no env)

    lines.clear()
    jobs = make(tmp_path / "w2")
    command_queue.run(jobs, 1, lines.append, 1, Ledger("study", tmp_path / "w2", jobs, root=root))
    assert lines == [] and not jobs[0].done()


def test_runs_finished_after_their_queue_stopped_are_recorded_once(tmp_path):
    jobs, lines = _plan(tmp_path / "w"), []
    _finish(jobs[0], 0.4, 0.4)
    _finish(jobs[2], 0.3, 0.3)
    runs = Ledger("study", tmp_path / "w", jobs, root=tmp_path / "ledger")
    runs.record_finished(log=lines.append)
    assert len(lines) == 2 and runs.entry("d/s1")["metrics"]["AP"] == 0.3 and runs.entry("d/s0") is None
    runs.record_finished(log=lines.append)
    assert len(lines) == 2


@pytest.mark.parametrize("study", ["distill_methods", "small_students"])
def test_the_committed_records_are_runs_the_study_still_plans(study, tmp_path):
    """A record whose command the study no longer plans is ignored by its reports: editing a plan
    (a flag, a schedule) must come with new runs, and this says which records it would orphan."""
    from benchmarks.harness.ledger import ROOT
    from benchmarks.studies import distill_methods, small_students

    records = sorted((ROOT / study).rglob("*.json"))
    if study == "distill_methods":
        runs = distill_methods.ledger(tmp_path, list(distill_methods.DATASETS), distill_methods.SEEDS)
    else:
        runs = Ledger(study, tmp_path, small_students.plan(tmp_path, list(small_students.DATASETS),
                                                           small_students.SEEDS))
    stale = [str(p.relative_to(ROOT)) for p in records
             if runs.entry(str(p.relative_to(ROOT / study).with_suffix(""))) is None]
    assert records and not stale
