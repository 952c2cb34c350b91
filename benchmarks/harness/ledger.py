"""The finished runs of a training study, kept in the repository (benchmarks/results/runs/STUDY/
NAME.json) so that a study longer than one machine's life goes on where the last machine stopped.

A study's work folder (teachers, dumps, students) is large and lives outside the repository; what
a report needs of each run is small: its COCO metrics, the command that made it, and for a
dump its bytes on disk. The queue (command_queue.run) records each run as it finishes; a run
whose record holds the same command is not run again, and a report reads records where the work
folder has no run. When a recorded run is needed again only as the input of another (a teacher a
new student learns from, on a fresh machine), it is rerun and must reproduce its record bit for
bit (the sha256 of its weights): CPU training here is deterministic for a given command and thread
count, and a teacher that differs would make the new students' numbers incomparable with the
recorded ones, so its dependants are not run and the log says why.

Commands are recorded with the work folder written $WORK and the repository $REPO, so records made
under one --workdir serve another.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "results" / "runs"
REPO = Path(__file__).resolve().parents[2]


def weights_sha256(checkpoint: Path) -> str:
    """sha256 over a checkpoint's state_dict (names, dtypes, shapes and bytes in name order): equal
    for two runs exactly when they trained the same weights, whatever else the file holds."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def folder_bytes(folder: Path, skip: tuple[str, ...] = ()) -> int:
    """The bytes of the files under folder (those named in skip left out)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.name not in skip)


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model() -> str | None:
    """The CPU's model name (bit-exact reruns may need the same kernels)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        return None


class Ledger:
    """The records of one study (None: none; reads the work folder only) for the jobs it plans now:
    a record whose command differs from the planned job's is ignored (and replaced when it reruns)."""

    def __init__(self, study: str | None, work: Path, jobs=(), root: Path = ROOT):
        self.work, self.root = Path(work), (Path(root) / study if study else None)
        self.jobs = list(jobs)
        self.commands = {j.name: self.portable(j.argv) for j in self.jobs}

    def portable(self, argv: list[str]) -> list[str]:
        work, repo = str(self.work.resolve()), str(REPO)
        out = []
        for a in argv:
            a = str(a)
            for prefix, token in ((work, "$WORK"), (str(self.work), "$WORK"), (repo, "$REPO")):
                if a == prefix or a.startswith(prefix + os.sep):
                    a = token + a[len(prefix):]
                    break
            out.append(a)
        return out

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def entry(self, name: str) -> dict | None:
        """The record of the planned run `name`, if it holds the command planned now."""
        if self.root is None or name not in self.commands or not self._path(name).is_file():
            return None
        rec = json.loads(self._path(name).read_text())
        return rec if rec.get("command") == self.commands[name] else None

    def record(self, job, wall_s: float | None, threads: int | None) -> tuple[bool, str]:
        """Record a finished job. -> (whether it agrees with an earlier record of the same command,
        a line for the log)."""
        if self.root is None:
            return True, ""
        old = self.entry(job.name)
        rec = {"name": job.name, "command": self.portable(job.argv)}
        if job.argv[0] == "make-synthetic":
            ann = json.loads((job.out / "annotations" / "instances_train.json").read_text())
            rec |= {"classes": len(ann["categories"]), "train_images": len(ann["images"]),
                    "train_boxes": len(ann["annotations"])}
        elif job.argv[0] == "dump-teacher":
            rec["bytes"] = folder_bytes(job.out)
            # the arrays' bytes alone: the metadata names paths that differ between work folders
            rec["data_bytes"] = folder_bytes(job.out, skip=("zarr.json",))
        else:
            rec["metrics"] = json.loads((job.out / "eval.json").read_text())["metrics"]
            rec["weights_sha256"] = weights_sha256(job.out / "checkpoints" / "last.pt")
        if old is not None:
            key = next(k for k in ("weights_sha256", "data_bytes", "train_boxes") if k in rec)
            if old.get(key) != rec[key]:
                return False, (f"{job.name} DIFFERS from its record ({key} {old.get(key)} -> {rec[key]}): runs that "
                               f"learn from it are not run; delete {self._path(job.name)} and its dependants' records "
                               "to start them over")
            return True, f"{job.name} reproduced its record ({key})"
        rec |= {"wall_s": None if wall_s is None else round(wall_s, 1), "threads": threads,
                "finished": datetime.now(UTC).isoformat(timespec="seconds"), "git": git_head(),
                "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "cpu": _cpu_model()}}
        try:
            import torch
            rec["torch"] = torch.__version__
        except ImportError:  # pragma: no cover - the harness always has torch
            pass
        path = self._path(job.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
        os.replace(tmp, path)
        return True, f"recorded {path.relative_to(REPO) if path.is_relative_to(REPO) else path}"

    def record_finished(self, jobs=None, log=lambda line: print(line, file=sys.stderr)) -> None:
        """Record the jobs (default: all planned) finished in the work folder but not yet recorded
        (a queue stopped while its last runs went on, or runs made before the study kept records)."""
        for job in self.jobs if jobs is None else jobs:
            if job.done() and self.entry(job.name) is None:
                note = self.record(job, None, None)[1]
                if note:
                    log(note)

    # What reports read: the work folder's run where there is one, else the record.

    def ap(self, name: str, key: str = "AP") -> float | None:
        """A finished run's COCO metric in percent (None: neither run nor recorded)."""
        path = self.work / name / "eval.json"
        if path.is_file():
            return 100 * json.loads(path.read_text())["metrics"][key]
        rec = self.entry(name)
        return 100 * rec["metrics"][key] if rec and "metrics" in rec else None

    def seed_stats(self, pattern: str, seeds: int) -> dict:
        """The APs of the finished runs pattern.format(seed) for seeds 0..seeds-1, their mean and sd."""
        aps = [a for s in range(seeds) if (a := self.ap(pattern.format(s))) is not None]
        return {"aps": aps, "mean": statistics.mean(aps) if aps else None,
                "sd": statistics.stdev(aps) if len(aps) > 1 else None}

    def classes(self, name: str, ann: Path) -> int | None:
        """The number of classes of the dataset made by the job `name` (its annotations here, else its record)."""
        if ann.is_file():
            return len(json.loads(ann.read_text())["categories"])
        rec = self.entry(name)
        return rec.get("classes") if rec else None

    def cache_bytes(self, name: str, folder: Path) -> int | None:
        """The bytes on disk of the dump `name` (its folder here, else its record)."""
        if folder.is_dir():
            return folder_bytes(folder)
        rec = self.entry(name)
        return rec.get("bytes") if rec else None
