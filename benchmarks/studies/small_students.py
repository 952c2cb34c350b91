"""Does distillation carry to the students people deploy? MobileNetV2 and ShuffleNetV2 1.0x students,
plain, LD (--recipe paper) and BCKD (--recipe bckd), each over seeds, from ONE dump per dataset.

    .venv/bin/python -m benchmarks.studies.small_students --workdir runs/distill_methods   # ~4 hours on 2 cores
    .venv/bin/python -m benchmarks.studies.small_students --workdir runs/distill_methods --report-only

It plans its datasets, teachers and dense dumps exactly as benchmarks/studies/distill_methods.py
does (benchmarks/harness/study.py teacher_jobs), so in the same work folder it reuses that study's
teachers and caches: the teacher's forwards are paid once for every student of both studies. Finished
runs are recorded in benchmarks/results/runs/small_students/ as distill_methods' are in its own.
Students: configs/synthetic-mobilenet-student.toml and configs/synthetic-shufflenet-student.toml
(the backbone from scratch under a 64-channel two-conv head, the ResNet students' schedule: 16
epochs, batch 8), with no weight flags. Table: per dataset and backbone, mean +- sd of AP over the
seeds and the share of the teacher-to-plain gap each method closes.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import study
from benchmarks.harness.command_queue import Job, needed, run
from benchmarks.harness.ledger import Ledger
from benchmarks.harness.study import CONFIGS

DATASETS = {name: study.DATASETS[name] for name in ("synth", "large8")}
BACKBONES = {"mobilenet_v2": CONFIGS / "synthetic-mobilenet-student.toml",
             "shufflenet_v2_x1_0": CONFIGS / "synthetic-shufflenet-student.toml"}
METHODS = {"plain": None, "ld": ["--recipe", "paper"], "bckd": ["--recipe", "bckd"]}
SCHEDULE = ["--epochs", "16", "--warmup-iters", "50", "--workers", "1"]
SEEDS = 3


def plan(work: Path, datasets: list[str], seeds: int) -> list[Job]:
    jobs: list[Job] = []
    for name in datasets:
        shared, data = study.teacher_jobs(work, name, DATASETS[name], {"cache": []})
        jobs += shared
        for s in range(seeds):
            seed = ["--seed", str(s)] if s else []
            for backbone, config in BACKBONES.items():
                for method, flags in METHODS.items():
                    label, out = f"{name}/{backbone}-{method}-s{s}", work / name / f"{backbone}-{method}-s{s}"
                    if flags is None:  # plain training: no teacher, no cache
                        argv, after = ["train-detector"], (f"{name}/data",)
                    else:
                        argv, after = ["train-student", "--cache", str(work / name / "cache.zarr"), *flags], \
                            (f"{name}/cache",)
                    jobs.append(Job(label, [*argv, "--config", str(config), *SCHEDULE, *data, *seed, "--out",
                                            str(out)], out, after))
    order = ["/data", "/teacher", "/cache", "-s0", "-s1", "-s2"]
    return sorted(jobs, key=lambda j: next((i for i, o in enumerate(order) if o in j.name), len(order)))


def report(runs: Ledger, jobs: list[Job], datasets: list[str], seeds: int) -> dict:
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    ms = lambda c: "-" if c["mean"] is None else f"{c['mean']:.1f} +- {f(c['sd'])} ({len(c['aps'])})"  # noqa: E731
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    text = ["### Light-weight students, plain, LD and BCKD from one dense dump per dataset, batch 8, no weight "
            "flags (AP: mean +- sd (seeds); share of the teacher-plain gap closed)", "",
            "| dataset | teacher | backbone | plain | ld | bckd | ld gap | bckd gap |", "|---" * 8 + "|"]
    out = {"datasets": {}}
    for name in datasets:
        teacher = runs.ap(f"{name}/teacher")
        for backbone in BACKBONES:
            cells = {m: runs.seed_stats(f"{name}/{backbone}-{m}-s{{}}", seeds) for m in METHODS}
            plain = cells["plain"]["mean"]
            gap = {m: (cells[m]["mean"] - plain) / (teacher - plain)
                   if None not in (teacher, plain, cells[m]["mean"]) and teacher > plain else None
                   for m in ("ld", "bckd")}
            out["datasets"].setdefault(name, {"teacher": teacher})[backbone] = {"runs": cells, "gap_closed": gap}
            text.append(f"| {name} | {f(teacher)} | {backbone} | " + " | ".join(ms(cells[m]) for m in METHODS)
                        + f" | {pct(gap['ld'])} | {pct(gap['bckd'])} |")
    return study.finish_report(out, jobs, text)


def main() -> None:
    args, work, datasets = study.parse_study(__doc__, "small_students", DATASETS, SEEDS)
    jobs = plan(work, datasets, args.seeds)
    runs = Ledger("small_students", work, jobs)  # the records in benchmarks/results/runs/small_students/
    if args.report_only:
        runs.record_finished()  # what finished after its queue was stopped
    else:
        with study.progress_log(work) as log:
            run(needed(jobs, args.only), args.parallel, log, args.threads, runs)
    result = report(runs, jobs, datasets, args.seeds)
    study.publish(args, result)


if __name__ == "__main__":
    main()
