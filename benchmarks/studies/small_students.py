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
from benchmarks.harness.study import CONFIGS, by_seed, gap_share, mean_sd, one, percent, seed_diffs

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
    text = ["### Light-weight students, plain, LD and BCKD from one dense dump per dataset, batch 8, no weight "
            "flags (AP: mean +- sd (seeds); share of the teacher-plain gap closed; AP over plain, seed by seed)", "",
            "| dataset | teacher | backbone | plain | ld | bckd | ld gap | bckd gap | ld - plain | bckd - plain |",
            "|---" * 10 + "|"]
    out = {"datasets": {}}
    for name in datasets:
        teacher = runs.ap(f"{name}/teacher")
        for backbone in BACKBONES:
            pattern = f"{name}/{backbone}-{{}}-s{{{{}}}}"  # .format(method) -> a seed pattern
            cells = {m: runs.seed_stats(pattern.format(m), seeds) for m in METHODS}
            plain = cells["plain"]["mean"]
            gap = {m: gap_share(teacher, plain, cells[m]["mean"]) for m in ("ld", "bckd")}
            diffs = {m: seed_diffs(runs, pattern.format(m), pattern.format("plain"), seeds)
                     for m in ("ld", "bckd")}
            out["datasets"].setdefault(name, {"teacher": teacher})[backbone] = {
                "runs": cells, "gap_closed": gap, "over_plain_by_seed": diffs}
            text.append(f"| {name} | {one(teacher)} | {backbone} | "
                        + " | ".join(mean_sd(cells[m]) for m in METHODS)
                        + f" | {percent(gap['ld'])} | {percent(gap['bckd'])} | "
                        f"{by_seed(diffs['ld'])} | {by_seed(diffs['bckd'])} |")
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
