"""LD against BCKD from ONE teacher dump per dataset: plain, LD (--recipe paper), BCKD (--recipe
bckd) and the best combination of the two, each over seeds, with no weight flags.

    .venv/bin/python -m benchmarks.studies.distill_methods                  # everything: ~5 hours on 2 CPU cores
    .venv/bin/python -m benchmarks.studies.distill_methods --report-only    # the tables from the runs so far

Every run is an `ldcache` command as a user types it (all in the JSON), in its own folder under
--workdir; finished runs are never redone and killed ones resume (benchmarks/harness/command_queue.py).
Each finished run is recorded in benchmarks/results/runs/distill_methods/ (its metrics, command and
weights digest; benchmarks/harness/ledger.py): commit the records and the study goes on from them on
another machine, rebuilding a teacher only where a new student needs it (bit for bit, or it stops).
Datasets, teachers and students are benchmarks/studies/ld_defaults.py's (500 train / 150 val images of at
most 160 px; R-34 x 1/2 teachers, 30 epochs; R-18 x 1/4 students, 16 epochs, batch 8), plus
`photos`: real pixels (make-synthetic --pixels photos: objects cut from scikit-image's sample
photographs, 12 classes, 1,000 train / 200 val images). Per dataset ONE dense dump serves every
distilled student, so the teacher's forwards are paid once. The combination is chosen from two
candidates run with seed 0 on every dataset (the largest mean gain over plain, over all five
datasets whatever --datasets a run covers: until all have run, no combination is run further),
then run with the other seeds. On the synthetic default the same students also learn from two compact ld+bckd caches
(dump-teacher --store-regions ld+bckd with --cls-topk 2, seed 0, and --cls-topk 4, every seed), to
check they train students as the dense cache does. Tables: per dataset mean +- sd of AP and the
share of the teacher-to-plain gap each method closes; the compact caches against the dense one;
the combination candidates. `--only REGEX` runs a subset (and what it waits on).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.harness import study
from benchmarks.harness.command_queue import Job, needed, run
from benchmarks.harness.ledger import Ledger
from benchmarks.harness.study import STUDENT_FLAGS, gap_share, mean_sd, one, percent

DATASETS = {**study.DATASETS,
            "photos": ["--pixels", "photos", "--num-classes", "12", "--num-train", "1000", "--num-val", "200"]}
METHODS = {"ld": ["--recipe", "paper"], "bckd": ["--recipe", "bckd"]}
# Combinations (LD's terms are typed on top of --recipe bckd, or BCKD's on top of the paper's)
COMBOS = {"bckd+ld": ["--recipe", "bckd", "--ld-weight", "0.25", "--vlr-weight", "0.25"],
          "paper+bckd": ["--recipe", "paper", "--bckd-cls-weight", "1", "--bckd-box-weight", "4"]}
# The compact ld+bckd caches on the synthetic default: top-2 and top-4 class logits (+ a floor)
SEEDS = 3
COMPACT = {"cache-compact": ["--store-regions", "ld+bckd", "--cls-topk", "2"],
           "cache-compact4": ["--store-regions", "ld+bckd", "--cls-topk", "4"]}
COMPACT_SEEDS = {"cache-compact": 1, "cache-compact4": SEEDS}  # top-2: seed 0 only


def plan(work: Path, datasets: list[str], seeds: int, best: str | None) -> list[Job]:
    jobs: list[Job] = []
    for name in datasets:
        root = work / name
        caches = {"cache": []} | (COMPACT if name == "synth" else {})
        shared, data = study.teacher_jobs(work, name, DATASETS[name], caches)
        jobs += shared
        for s in range(seeds):
            seed = ["--seed", str(s)] if s else []
            out = root / f"plain-s{s}"
            jobs.append(Job(f"{name}/plain-s{s}", ["train-detector", *STUDENT_FLAGS, *data, *seed, "--out", str(out)],
                            out, (f"{name}/data",)))
            methods = {**METHODS, **{c: COMBOS[c] for c in COMBOS if s == 0 or c == best}}
            for cache in caches:
                for method, flags in methods.items():
                    if cache != "cache" and (method not in (*METHODS, best) or s >= COMPACT_SEEDS[cache]):
                        continue  # the compact caches: LD, BCKD and the chosen combination
                    label = f"{method}-s{s}" + cache.removeprefix("cache")
                    out = root / label
                    jobs.append(Job(f"{name}/{label}", ["train-student", "--cache", str(root / f"{cache}.zarr"),
                                                        *STUDENT_FLAGS, *data, *flags, *seed, "--out", str(out)],
                                    out, (f"{name}/{cache}",)))
    order = ["/data", "/teacher", "/cache", "/plain-s0", "/ld-s0", "/bckd-s0", "-s0", "/plain-s", "/ld-s", "/bckd-s"]
    return sorted(jobs, key=lambda j: next((i for i, o in enumerate(order) if o in j.name), len(order)))


def choose_combo(runs: Ledger, datasets: list[str]) -> tuple[str | None, dict]:
    """The combination with the largest mean gain over plain (seed 0) over the datasets that ran them all."""
    gains = {}
    for combo in COMBOS:
        pairs = [(runs.ap(f"{n}/{combo}-s0"), runs.ap(f"{n}/plain-s0")) for n in datasets]
        if pairs and all(a is not None and p is not None for a, p in pairs):
            gains[combo] = statistics.mean(a - p for a, p in pairs)
    return (max(gains, key=gains.get) if len(gains) == len(COMBOS) else None), gains


def report(work: Path, runs: Ledger, jobs: list[Job], datasets: list[str], seeds: int, best: str | None,
           gains: dict) -> dict:
    methods = ["plain", *METHODS, *([best] if best else [])]
    out, text = {"datasets": {}, "best_combination": best, "combination_gains_seed0": gains}, []
    text += [f"### Plain, LD, BCKD and the best combination ({best or 'not chosen yet'}), batch 8, no weight flags, "
             "one dense dump per dataset (AP: mean +- sd (seeds); share of the teacher-plain gap closed)", "",
             "| dataset | classes | teacher | " + " | ".join(methods) + " | "
             + " | ".join(f"{m} gap" for m in methods[1:]) + " |",
             "|---" * (3 + 2 * len(methods) - 1) + "|"]
    for name in datasets:
        classes = runs.classes(f"{name}/data", work / "data" / name / "annotations" / "instances_train.json")
        teacher = runs.ap(f"{name}/teacher")
        cells = {m: runs.seed_stats(f"{name}/{m}-s{{}}", seeds) for m in methods}
        plain = cells["plain"]["mean"]
        gap = {m: gap_share(teacher, plain, cells[m]["mean"]) for m in methods[1:]}
        out["datasets"][name] = {"classes": classes, "teacher": teacher, "runs": cells, "gap_closed": gap}
        text.append(f"| {name} | {classes or '-'} | {one(teacher)} | " + " | ".join(mean_sd(cells[m]) for m in methods)
                    + " | " + " | ".join(percent(gap[m]) for m in methods[1:]) + " |")
    text += ["", "### Combination candidates (seed 0; AP, and the mean gain over plain)", "",
             "| combination | flags | " + " | ".join(datasets) + " | mean gain |",
             "|---|---|" + "---|" * len(datasets) + "---|"]
    for combo, flags in COMBOS.items():
        aps = [one(runs.ap(f"{n}/{combo}-s0")) for n in datasets]
        text.append(f"| {combo} | `{' '.join(flags)}` | " + " | ".join(aps) + f" | {one(gains.get(combo))} |")
    if "synth" in datasets:
        text += ["", "### The compact ld+bckd caches against the dense one (synth, mean +- sd over seeds)", "",
                 "| method | dense cache | ld+bckd top-2 | ld+bckd top-4 |", "|---|---|---|---|"]
        out["compact"] = {}
        for m in [*METHODS, *([best] if best else [])]:
            cells = {c: runs.seed_stats(f"synth/{m}-s{{}}" + c.removeprefix("cache"), seeds)
                     for c in ("cache", *COMPACT)}
            out["compact"][m] = cells
            text.append(f"| {m} | " + " | ".join(mean_sd(c) for c in cells.values()) + " |")
        sizes = {c: b for c in ("cache", *COMPACT)
                 if (b := runs.cache_bytes(f"synth/{c}", work / "synth" / f"{c}.zarr")) is not None}
        out["cache_bytes"] = sizes
        if "cache" in sizes:
            text.append("\nsynth caches on disk: " + ", ".join(
                f"{c} {b / 2**20:.1f} MiB ({b / sizes['cache']:.3f}x)" for c, b in sizes.items()))
    return study.finish_report(out, jobs, text)


def ledger(work: Path, datasets: list[str], seeds: int) -> Ledger:
    """The study's records (benchmarks/results/runs/distill_methods/) for every run it may plan."""
    jobs = {j.name: j for best in (None, *COMBOS) for j in plan(work, datasets, seeds, best)}
    return Ledger("distill_methods", work, jobs.values())


def main() -> None:
    args, work, datasets = study.parse_study(__doc__, "distill_methods", DATASETS, SEEDS)
    # Records of every dataset: the combination is chosen over all five, whichever --datasets runs now
    everything = list(DATASETS)
    runs = ledger(work, everything, args.seeds)
    if args.report_only:
        runs.record_finished()  # what finished after its queue was stopped
    else:
        with study.progress_log(work) as log:
            # Phase 1: every method with every seed, and the candidates with seed 0; phase 2: the
            # chosen combination with the other seeds.
            run(needed(plan(work, datasets, args.seeds, None), args.only), args.parallel, log, args.threads, runs)
            best, _ = choose_combo(runs, everything)
            if best is not None:
                log(f"best combination: {best}")
                run(needed(plan(work, datasets, args.seeds, best), args.only), args.parallel, log, args.threads,
                    runs)
    best, gains = choose_combo(runs, everything)
    jobs = plan(work, datasets, args.seeds, best)
    result = report(work, runs, jobs, datasets, args.seeds, best, gains)
    study.publish(args, result)


if __name__ == "__main__":
    main()
