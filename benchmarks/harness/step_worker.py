"""One training step per process, timed on command: the worker loop behind vs_mmdetection.py.

Each variant of a side-by-side comparison runs in a process of its own that builds one model (as a
training job would) and then waits; the driver sends one JSON command per stdin line and reads one
JSON answer per stdout line, so steps of different variants and virtual environments alternate in
one run without sharing a process, an allocator or a thread pool:
    {"build": NAME}                        ->  {"built": NAME, "seconds": ..., **info}
    {"time": NAME, "steps": N, "warmup": W} ->  {"ms_per_step": [...], "minflt_per_step": ...}
    {"profile": NAME, "steps": N}          ->  {"ops": {operator: [self ms, calls, self CPU ms] per step}}
Only the standard library and torch are imported here: mmdetection's venv (benchmarks/harness/mmdet_side.py)
uses this loop as well as ours.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable

import torch

Step = Callable[[], None]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    """Page faults served without I/O so far (fresh pages the allocator maps and the kernel zeroes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(step: Step, steps: int, warmup: int, device: torch.device) -> dict:
    """Milliseconds of each of `steps` steps after `warmup` untimed ones, and the minor page faults
    per timed step."""
    for _ in range(warmup):
        step()
    sync(device)
    times, faults = [], minor_faults()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return {"ms_per_step": times, "minflt_per_step": (minor_faults() - faults) / max(steps, 1)}


def profile_ops(step: Step, steps: int, device: torch.device) -> dict:
    """torch.profiler over `steps` steps (after one untimed): each operator's self time in ms per step
    (on a GPU the device time of the kernels it launched), its calls per step and its self CPU time.
    Only operators count: profiler ranges of a step's own code (our record_function phases) have no
    counterpart in another codebase, and on a GPU the kernel events would count the same time twice."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    ops: dict[str, list[float]] = {}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CPU or event.is_user_annotation:
            continue
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        total = ops.setdefault(event.key, [0.0, 0.0, 0.0])
        total[0] += self_us / 1000 / steps
        total[1] += event.count / steps
        total[2] += event.self_cpu_time_total / 1000 / steps
    return {"ops": ops}


def serve(build: Callable[[str], tuple[Step, dict]], device: torch.device, stream=None) -> None:
    """Answer the driver's commands until stdin closes; build(name) returns the step and facts about it.
    The answers go to the stdout the process started with, and anything else printed (a library's
    print or log line) to stderr, so nothing but answers reaches the driver's pipe."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    steps: dict[str, Step] = {}
    for line in stream or sys.stdin:
        command = json.loads(line)
        if "build" in command:
            start = time.perf_counter()
            steps[command["build"]], info = build(command["build"])
            answer = {"built": command["build"], "seconds": time.perf_counter() - start, **info}
        elif "time" in command:
            answer = time_steps(steps[command["time"]], command["steps"], command["warmup"], device)
        else:
            answer = profile_ops(steps[command["profile"]], command["steps"], device)
        print(json.dumps(answer), file=answers, flush=True)
