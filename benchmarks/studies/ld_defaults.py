"""Do the default loss settings help out of the box? Plain vs LD students with no weight flags,
across batch sizes, datasets and seeds, plus the paper's ablation and VLR gamma sweep.

    .venv/bin/python -m benchmarks.studies.ld_defaults                 # everything: ~2 hours on 2 CPU cores
    .venv/bin/python -m benchmarks.studies.ld_defaults --report-only   # the tables from the runs so far

Every run is an `ldcache` command as a user types it (printed in the JSON), in its own folder
under --workdir; a finished run (eval.json) is never redone, a killed one resumes, so the script
can be stopped and started again. Runs go --parallel at a time, each with cores / parallel
threads. Three datasets made by `ldcache make-synthetic`, each 500 train / 150 val images of at
most 160 px (the demo's size, so the whole study fits a 2-core CPU): synth (the synthetic
default's statistics: 6 classes, ~4.6 objects per image), dense1 (1 class, 15-40 small objects)
and large8 (8 classes, 1-3 large objects). Teachers: configs/synthetic-teacher.toml at the demo's
width and 30 epochs; students: configs/synthetic-student.toml at 16 epochs (batch 8, AdamW lr
0.001; other batch sizes scale lr linearly, the existing rule). No loss flag anywhere except in
the ablation rows. Tables: AP of plain vs LD per batch size; per dataset with the share of the
teacher-to-plain gap that LD closes (the paper closes 19% for R-18 and 43% for R-50 on COCO);
seeds 0-2 (mean and spread); ablation (plain, Main LD, + VLR LD, + Main KD); VLR gamma
0 / 0.25 / 0.5 / 1; and the normalisations compared.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.harness import study
from benchmarks.harness.command_queue import Job, needed, run
from benchmarks.harness.ledger import folder_bytes
from benchmarks.harness.study import (
    DATASETS,
    SIZE,
    SPARSE_U8,
    STUDENT_FLAGS,
    TEACHER_FLAGS,
    ap,
    chosen_datasets,
    gap_share,
    mean_sd,
    one,
    percent,
    progress_log,
    seed_stats,
    study_args,
)

VARIANTS = {  # LD variants of the synthetic default at batch 8 (the ablation, gamma, normalisations)
    "mainld": ["--vlr-weight", "0", "--kd-weight", "0"], "mainld-vlr": ["--kd-weight", "0"],
    "gamma0": ["--vlr-gamma", "0"], "gamma0.5": ["--vlr-gamma", "0.5"], "gamma1": ["--vlr-gamma", "1"],
    "official": ["--ld-normalization", "official", "--kd-normalization", "official"],
    "positive": ["--ld-normalization", "positive"], "sigmoidkd": ["--kd-mode", "sigmoid"],
    "T1": ["--ld-temperature", "1"], "T10": ["--ld-temperature", "10"],  # the temperature rule's evidence
}
# Which variants run where: all but sigmoidkd on the synthetic default; on the one-class data the
# ablation and the sigmoid KD that --kd-mode auto leaves out there; the per-positive normalisation everywhere.
VARIANTS_OF = {"synth": [v for v in VARIANTS if v not in ("sigmoidkd", "T10")],
               "dense1": ["mainld", "mainld-vlr", "sigmoidkd", "positive", "T10"], "large8": ["positive", "T1"],
               "tiny6": ["T10"]}
# On the small-object datasets (where the default LD temperature is 1) the paper's T = 10 over every seed.
VARIANT_SEEDS = {("dense1", "T10"): 3, ("tiny6", "T10"): 3}
SEEDS_OF = {"dense1": 3, "large8": 3, "tiny6": 3}  # besides the synthetic default's --seeds
SEED_BATCHES = (8, 2)  # the synthetic default's batch sizes run with every seed (the acceptance's two)


def plan(work: Path, seeds: int, batches: list[int], datasets: list[str] | None = None) -> list[Job]:
    jobs: list[Job] = []
    for name, make in DATASETS.items():
        if datasets is not None and name not in datasets:
            continue
        root, d = work / name, work / "data" / name
        jobs.append(Job(f"{name}/data", ["make-synthetic", str(d), *SIZE, *make], d))
        data = ["--images", str(d / "train"), "--ann", str(d / "annotations" / "instances_train.json"),
                "--val-images", str(d / "val"), "--val-ann", str(d / "annotations" / "instances_val.json"),
                "--img-scale", "160,160"]
        needs = (f"{name}/data",)
        teacher = root / "teacher"
        jobs.append(Job(f"{name}/teacher", ["train-detector", *TEACHER_FLAGS, *data, "--out", str(teacher)],
                        teacher, needs))
        cache = root / "cache.zarr"  # the dump takes the teacher's img-scale
        jobs.append(Job(f"{name}/cache", ["dump-teacher", "--teacher", str(teacher / "checkpoints" / "last.pt"),
                                          *data[:4], "--out", str(cache)], cache, (f"{name}/teacher",)))
        runs = ([(b, 0) for b in batches] + [(b, s) for b in SEED_BATCHES for s in range(1, seeds)] if name == "synth"
                else [(8, s) for s in range(SEEDS_OF.get(name, 1))])
        for b, s in runs:
            extra = [*data, "--batch-size", str(b), "--lr", f"{0.001 * b / 8:g}", "--seed", str(s)]
            for kind in ("plain", "ld"):
                out = root / f"{kind}-b{b}-s{s}"
                argv = (["train-detector"] if kind == "plain" else ["train-student", "--cache", str(cache)])
                jobs.append(Job(f"{name}/{kind}-b{b}-s{s}", [*argv, *STUDENT_FLAGS, *extra, "--out", str(out)],
                                out, needs if kind == "plain" else (f"{name}/cache",)))
        if name == "synth":  # the smallest large-dataset cache (docs/coco.md): region-sparse + uint8
            small = root / "cache-sparse-u8.zarr"
            argv = ["dump-teacher", "--teacher", str(teacher / "checkpoints" / "last.pt"), *data[:4], *SPARSE_U8,
                    "--out", str(small)]
            jobs.append(Job(f"{name}/cache-sparse-u8", argv, small, (f"{name}/teacher",)))
            for s in range(seeds):  # the recipe's batch 8 and lr; seed 0 is the default
                out = root / f"ld-b8-s{s}-sparse-u8"
                argv = ["train-student", "--cache", str(small), *STUDENT_FLAGS, *data,
                        *(["--seed", str(s)] if s else []), "--out", str(out)]
                jobs.append(Job(f"{name}/ld-b8-s{s}-sparse-u8", argv, out, (f"{name}/cache-sparse-u8",)))
        for variant in VARIANTS_OF[name]:
            for s in range(VARIANT_SEEDS.get((name, variant), 1)):
                out = root / f"ld-b8-s{s}-{variant}"
                argv = ["train-student", "--cache", str(cache), *STUDENT_FLAGS, *data, *VARIANTS[variant],
                        *(["--seed", str(s)] if s else []), "--out", str(out)]
                jobs.append(Job(f"{name}/ld-b8-s{s}-{variant}", argv, out, (f"{name}/cache",)))
    return sorted(jobs, key=lambda j: _priority(j.name))


# What the acceptance rests on runs first (the teachers start early: they are the longest runs):
# defaults vs plain at batch 8 and 2 on every dataset, then seeds, ablation, the other batch sizes.
PRIORITY = [r".*/data", r".*/teacher", r"synth/plain-b8-s0", r".*/cache", r"synth/(plain|ld)-b8-s0",
            r".*/(plain|ld)-b8-s0", r"synth/(plain|ld)-b2-s0", r"synth/(plain|ld)-b8-s\d",
            r"synth/ld-b8-s0-mainld.*", r"synth/ld-b8-s0-official", r"synth/(cache|ld-b8-s\d)-sparse-u8",
            r"synth/ld-b8-s0-gamma.*", r"synth/.*-b(16|4)-s0"]


def _priority(name: str) -> int:
    return next((i for i, pattern in enumerate(PRIORITY) if re.fullmatch(pattern, name)), len(PRIORITY))


def _objects_per_image(coco: dict) -> float:
    return sum(not a.get("iscrowd") for a in coco["annotations"]) / max(len(coco["images"]), 1)


def _gap_shares(work: Path, name: str) -> dict | None:
    """The share of the teacher's AP lead over plain-b8-s0 that the teacher's boxes alone, or its scores
    alone, recover (harness/gap.py), computed once into NAME/gap.json."""
    cached, teacher, student = work / name / "gap.json", work / name / "teacher", work / name / "plain-b8-s0"
    if not cached.is_file():
        if not all((run / "checkpoints" / "last.pt").is_file() for run in (teacher, student)):
            return None
        from benchmarks.harness import gap

        data = work / "data" / name
        metrics = gap.decompose(str(teacher / "checkpoints" / "last.pt"), str(student / "checkpoints" / "last.pt"),
                                str(data / "val"), str(data / "annotations" / "instances_val.json"), (160, 160))
        shares = gap.shares(metrics)
        cached.write_text(json.dumps({"boxes": shares["student scores + teacher boxes"],
                                      "scores": shares["teacher scores + student boxes"], "metrics": metrics}))
    return json.loads(cached.read_text())


def report(work: Path, jobs: list[Job], seeds: int, batches: list[int]) -> dict:
    out, text = {"batches": [], "datasets": [], "seeds": {}, "variants": {}}, []
    text += ["### Batch size (synthetic default, seed 0, lr = 0.001 x batch / 8)", "",
             "| images per step | plain AP | LD AP (defaults) | LD - plain |", "|---|---|---|---|"]
    for b in batches:
        p, d = ap(work, f"synth/plain-b{b}-s0"), ap(work, f"synth/ld-b{b}-s0")
        out["batches"].append({"batch": b, "plain": p, "ld": d})
        text.append(f"| {b} | {one(p)} | {one(d)} | {one(d - p) if p is not None and d is not None else '-'} |")
    text += ["", "### Seeds", "", "| | batch | seeds | AP mean | spread (sd) | APs |", "|---|---|---|---|---|---|"]
    for name, b, n in [*(("synth", b, seeds) for b in SEED_BATCHES), *((d, 8, n) for d, n in SEEDS_OF.items())]:
        for kind in ("plain", "ld"):
            key = (kind if name == "synth" else f"{name}/{kind}") + ("" if b == 8 else f"/b{b}")
            c = out["seeds"][key] = seed_stats(work, f"{name}/{kind}-b{b}-s{{}}", n)
            text.append(f"| {name} {kind} | {b} | {len(c['aps'])} | {one(c['mean'])} | {one(c['sd'])} | "
                        f"{', '.join(f'{a:.1f}' for a in c['aps'])} |")
    c = out["seeds"]["ld/sparse-u8"] = seed_stats(work, "synth/ld-b8-s{}-sparse-u8", seeds)
    text.append(f"| synth ld, region-sparse uint8 cache | 8 | {len(c['aps'])} | {one(c['mean'])} | {one(c['sd'])} | "
                f"{', '.join(f'{a:.1f}' for a in c['aps'])} |")
    text += ["", "### The LD temperature (batch 8; mean +- sd (seeds); * = the default's choice)", "",
             "| dataset | median positive edge (bins) | plain | LD, T = 1 | LD, T = 10 (the paper's) |",
             "|---|---|---|---|---|"]
    out["temperature"] = {}
    for name in DATASETS:
        configs = [json.loads(c.read_text()) for c in sorted((work / name).glob("ld-b8-s*/config.json"))]
        configs = [c for c in configs if "median_edge_bins" in c] or configs  # runs from before the rule lack it
        edge, default = ((configs[0].get("median_edge_bins"), configs[0]["loss"]["ld_temperature"]) if configs
                         else (None, None))
        # the default LD run is the T = 1 or the T = 10 column, the variant the other one
        other = "T1" if default == 10 else "T10"
        cells = {key: seed_stats(work, f"{name}/{pattern}", SEEDS_OF.get(name, seeds))
                 for key, pattern in (("plain", "plain-b8-s{}"), ("default", "ld-b8-s{}"),
                                      ("other", f"ld-b8-s{{}}-{other}"))}
        by_t = {1: cells["default"], 10: cells["other"]} if default == 1 else {1: cells["other"], 10: cells["default"]}
        out["temperature"][name] = {"median_edge_bins": edge, "default_temperature": default, "plain": cells["plain"],
                                    "T1": by_t[1], "T10": by_t[10]}
        star = {t: "*" if default == t else "" for t in (1, 10)}
        text.append(f"| {name} | {'-' if edge is None else f'{edge:.2f}'} | {mean_sd(cells['plain'])} | "
                    f"{mean_sd(by_t[1], star[1])} | {mean_sd(by_t[10], star[10])} |")
    text += ["", "### Datasets (batch 8, mean over seeds, no weight flags)", "",
             "| dataset | classes | objects / image | teacher AP | plain AP | LD AP | gap closed | teacher's boxes / "
             "scores alone recover |", "|---|---|---|---|---|---|---|---|"]
    for name in DATASETS:
        ann = work / "data" / name / "annotations" / "instances_train.json"
        t = ap(work, f"{name}/teacher")
        # batch 8
        p, d = (out["seeds"][kind if name == "synth" else f"{name}/{kind}"]["mean"] for kind in ("plain", "ld"))
        share = gap_share(t, p, d)
        coco = json.loads(ann.read_text()) if ann.is_file() else None
        classes = len(coco["categories"]) if coco else None
        gap = _gap_shares(work, name)
        row = {"dataset": name, "classes": classes, "objects_per_image": _objects_per_image(coco) if coco else None,
               "teacher": t, "plain": p, "ld": d, "gap_closed": share, "gap_decomposition": gap}
        out["datasets"].append(row)
        text.append(f"| {name} | {classes} | {one(row['objects_per_image'])} | {one(t)} | {one(p)} | {one(d)} | "
                    f"{percent(share)} | {percent(gap and gap['boxes'])} / {percent(gap and gap['scores'])} |")
    text += ["", "### Ablation, VLR gamma and normalisations (synthetic default, batch 8, seed 0)", "",
             "| run | flags | AP | AP50 | AP75 |", "|---|---|---|---|---|"]
    rows = [("plain", "train-detector", "synth/plain-b8-s0"),
            ("Main LD", "--vlr-weight 0 --kd-weight 0", "synth/ld-b8-s0-mainld"),
            ("+ VLR LD", "--kd-weight 0", "synth/ld-b8-s0-mainld-vlr"), ("+ Main KD (defaults)", "", "synth/ld-b8-s0")]
    rows += [(f"gamma {g}", f"--vlr-gamma {g}", f"synth/ld-b8-s0-gamma{g}") for g in ("0", "0.5", "1")]
    rows += [("official normalisation", " ".join(VARIANTS["official"]), "synth/ld-b8-s0-official")]
    rows += [("dense1: plain", "train-detector", "dense1/plain-b8-s0"),
             ("dense1: Main LD", "--vlr-weight 0 --kd-weight 0", "dense1/ld-b8-s0-mainld"),
             ("dense1: + VLR LD (defaults: no Main KD on one class)", "", "dense1/ld-b8-s0"),
             ("dense1: + sigmoid Main KD", "--kd-mode sigmoid", "dense1/ld-b8-s0-sigmoidkd")]
    rows += [("from a region-sparse uint8 cache", "dump: " + " ".join(SPARSE_U8), "synth/ld-b8-s0-sparse-u8")]
    rows += [(f"positive normalisation ({n})", "--ld-normalization positive", f"{n}/ld-b8-s0-positive")
             for n in DATASETS if "positive" in VARIANTS_OF[n]]
    rows += [(f"LD temperature 1 ({n}; its default is 10)", "--ld-temperature 1", f"{n}/ld-b8-s0-T1")
             for n in DATASETS if "T1" in VARIANTS_OF[n]]
    for label, flags, run_name in rows:
        m = [ap(work, run_name, k) for k in ("AP", "AP50", "AP75")]
        out["variants"][run_name] = dict(zip(("AP", "AP50", "AP75"), m))
        text.append(f"| {label} | `{flags}` | {' | '.join(one(v) for v in m)} |")
    sizes = {c: folder_bytes(work / "synth" / c)
             for c in ("cache.zarr", "cache-sparse-u8.zarr") if (work / "synth" / c).is_dir()}
    if len(sizes) == 2:
        text += ["", f"synth caches on disk: dense fp16 {sizes['cache.zarr'] / 2**20:.1f} MiB, region-sparse uint8 "
                     f"{sizes['cache-sparse-u8.zarr'] / 2**20:.1f} MiB "
                     f"({sizes['cache-sparse-u8.zarr'] / sizes['cache.zarr']:.3f}x)"]
    out["cache_bytes"] = sizes
    return study.finish_report(out, jobs, text)


def main() -> None:
    p = study_args(__doc__.split("\n\n")[0], "ld_defaults", DATASETS)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batches", default="2,4,8,16")
    args = p.parse_args()
    work, batches = Path(args.workdir), [int(b) for b in args.batches.split(",")]
    jobs = plan(work, args.seeds, batches, chosen_datasets(p, args, DATASETS))
    if not args.report_only:
        with progress_log(work) as log:
            run(needed(jobs, args.only), args.parallel, log, args.threads)
    result = report(work, jobs, args.seeds, batches)
    study.publish(args, result)


if __name__ == "__main__":
    main()
