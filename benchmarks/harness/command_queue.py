"""A resumable queue of ldcache commands for the benchmarks that train many models: each job is one
command with its output folder and the jobs it waits on; a finished job (its output complete) is
never redone, a killed training resumes (--resume), and jobs run --parallel at a time. With a
ledger (benchmarks/harness/ledger.py) a job recorded in the repository is not redone either, unless
a job that must run waits on it and its output is not here (then it reruns and must reproduce its
record). Used by the studies in benchmarks/studies/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LDCACHE = Path(sys.executable).with_name("ldcache")


@dataclass
class Job:
    name: str
    argv: list[str]
    out: Path
    after: tuple[str, ...] = ()
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float = field(default=0.0, repr=False)

    def done(self) -> bool:
        if self.argv[0] == "make-synthetic":
            return (self.out / "annotations" / "instances_val.json").is_file()
        if self.argv[0] == "dump-teacher":
            meta = self.out / "zarr.json"
            return meta.is_file() and json.loads(meta.read_text())["attributes"]["ldcache"]["complete"]
        return (self.out / "eval.json").is_file()


def needed(jobs: list[Job], only: str | None) -> list[Job]:
    """The jobs whose names match the regular expression `only` and everything they wait on."""
    if only is None:
        return jobs
    by_name = {j.name: j for j in jobs}
    keep, stack = set(), [j.name for j in jobs if re.search(only, j.name)]
    while stack:
        name = stack.pop()
        if name not in keep:
            keep.add(name)
            stack += by_name[name].after
    return [j for j in jobs if j.name in keep]


def to_run(jobs: list[Job], ledger=None) -> list[Job]:
    """The jobs neither done here nor recorded, and what they wait on that is not done here, in
    the order given."""
    by_name = {j.name: j for j in jobs}
    keep = {j.name for j in jobs if not j.done() and (ledger is None or ledger.entry(j.name) is None)}
    stack = list(keep)
    while stack:
        for a in by_name[stack.pop()].after:
            if a not in keep and not by_name[a].done():
                keep.add(a)
                stack.append(a)
    return [j for j in jobs if j.name in keep]


def run(jobs: list[Job], parallel: int, log, threads: int | None = None, ledger=None) -> None:
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if ledger is not None:
        # A recorded run must reproduce bit for bit where the study goes on, and every record was
        # trained on the CPU (--device auto): a GPU the machine has would give other weights.
        env["CUDA_VISIBLE_DEVICES"] = ""
    by_name, running, failed = {j.name: j for j in jobs}, [], set()
    if ledger is not None:
        ledger.record_finished(jobs, log)
    todo = to_run(jobs, ledger)
    while todo or running:
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            ok = job.proc.returncode == 0 and job.done()
            note = ""
            if ok and ledger is not None:
                ok, note = ledger.record(job, time.monotonic() - job.started, threads)
            failed |= set() if ok else {job.name}
            log(f"{'done' if ok else 'FAILED'}: {job.name}" + (f" ({note})" if note else ""))
        ready = [j for j in todo if all(by_name[a].done() for a in j.after)]
        todo = [j for j in todo if not any(a in failed for a in j.after)]
        while ready and len(running) < parallel:
            job = ready.pop(0)
            todo.remove(job)
            job.out.parent.mkdir(parents=True, exist_ok=True)
            with open(job.out.parent / f"{job.out.name}.log", "a") as f:
                job.proc = subprocess.Popen(
                    [str(LDCACHE), *job.argv, *(["--resume"] if job.argv[0].startswith("train") else [])],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            job.started = time.monotonic()
            running.append(job)
            log(f"start: {job.name} ({len(todo)} waiting)")
        if not ready and not running and todo:
            break  # what is left waits on failed jobs
        time.sleep(5)
