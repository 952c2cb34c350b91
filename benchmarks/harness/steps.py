"""Student training steps as the benchmarks time them: the engine's own train_step
(distill.step) on a freshly built, seeded student, over the engine's seeded batches, with the
teacher source of a variant:
- plain:     no teacher (GFL losses only);
- cache:     cache_teacher.targets.CachedTeacher (rows read in the loader workers, decoded on the device);
- cache-mem: the same with every view's rows read once beforehand (the distillation terms without reads);
- online:    distill.teachers.OnlineTeacher (the teacher's forward on every batch).
Shared by train_throughput.py and vs_mmdetection.py."""

from __future__ import annotations

import contextlib
import gc
import time

import torch

from benchmarks.harness import common
from cache_teacher.dump import DumpConfig, run_dump
from cache_teacher.targets import CachedTeacher, SampleWithRows
from data.coco import collate
from data.config import DataConfig
from data.sampler import ViewBatchSampler, batch_groups
from detector.config import ModelConfig
from detector.model import build_detector
from distill.config import LossConfig, TrainConfig
from distill.criterion import build_criterion
from distill.engine import build_optimizer, lr_at
from distill.step import Learner, train_step
from distill.teachers import OnlineTeacher

MB = 2**20


class EndlessBatches:
    """ViewBatchSampler's batches, epoch after epoch (a run shorter or longer than an epoch sees the
    engine's batches in the engine's order)."""

    def __init__(self, sampler: ViewBatchSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.sampler
            epoch += 1


class InMemoryTargets(torch.utils.data.Dataset):
    """CachedTargetDataset with every view's stored rows read up front: a step pays no cache read."""

    def __init__(self, cached):
        self.cached = cached
        self.rows = {(i, s): cached.stored_rows((i, s)) for i in range(len(cached.base))
                     for s in range(len(cached.base.views))}

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, key):
        key = tuple(key)
        return SampleWithRows(self.cached.base[key], dict(self.rows[key]))


class InMemoryCachedTeacher(CachedTeacher):
    def dataset(self, base, needs):
        return InMemoryTargets(super().dataset(base, needs))


def make_cache(teacher_path: str, images: str, ann: str, store, views: str, img_scale, batch_size: int, device: str,
               workers: int, amp: str, box_dtype: str = "float16", shard_mb: float = 64.0) -> float:
    """Dump the teacher over the images into `store`; seconds taken. Restores the cuDNN flags
    run_dump sets (a student run is a separate process with the defaults)."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    cfg = DumpConfig(
        teacher=teacher_path,
        out=str(store),
        data=DataConfig(images=images, ann=ann, views=views, img_scale=img_scale),
        batch_size=batch_size,
        device=device,
        workers=workers,
        amp=amp,
        box_dtype=box_dtype,
        shard_mb=shard_mb,
    )
    start = time.perf_counter()
    try:
        run_dump(cfg, progress=False)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags
    return time.perf_counter() - start


class StepBench:
    """What every (variant, round) shares: the data, the student's architecture, the teachers."""

    def __init__(self, dataset, student_cfg: ModelConfig, teachers: dict, device: torch.device, batch_size: int,
                 workers: int, amp: str, optimizer: str = "sgd", lr: float | None = None, seed: int = 0,
                 loss: LossConfig = LossConfig()):
        self.dataset, self.student_cfg, self.teachers, self.device = dataset, student_cfg, teachers, device
        self.train = TrainConfig(batch_size=batch_size, optimizer=optimizer, lr=lr, seed=seed, device=str(device),
                                 amp=amp, workers=workers)
        self.loss = loss  # default: the paper's full recipe, Main LD + VLR LD + Main KD
        self.groups = batch_groups(dataset, "orientation")

    def run(self, variant: str, steps: int, warmup: int, profile: bool = False) -> dict:
        """A fresh student (same seed), optimizer and DataLoader; `warmup` untimed steps, then
        `steps` timed ones on the same loader iterator. Data wait = time spent in next(loader).
        profile: the timed steps run under torch.profiler and "phases_ms" gives ms per step of each
        phase of distill.step (the profiler's own overhead included)."""
        device, train = self.device, self.train
        cuda = device.type == "cuda"
        teacher = self.teachers.get(variant)
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if isinstance(teacher, OnlineTeacher):
            teacher.model.to(device)
        torch.manual_seed(train.seed)
        model = build_detector(self.student_cfg).to(device).train()
        optimizer = build_optimizer(train, [p for p in model.parameters() if p.requires_grad])
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and train.amp == "fp16")
        learner = Learner(model, optimizer, scaler, build_criterion(self.loss, self.student_cfg), device, train.amp,
                          teacher)
        sampler = ViewBatchSampler(self.groups, batch_size=train.batch_size, seed=train.seed)
        data = teacher.dataset(self.dataset, self.loss.teacher_needs()) if teacher is not None else self.dataset
        loader = torch.utils.data.DataLoader(data, batch_sampler=EndlessBatches(sampler), num_workers=train.workers,
                                             collate_fn=teacher.collate if teacher is not None else collate,
                                             pin_memory=cuda, persistent_workers=False)
        batches = {"it": iter(loader)}  # dropped at the end, which shuts the workers down
        waited, losses = 0.0, {}

        def step(iteration: int) -> int:
            nonlocal waited, losses
            t0 = time.perf_counter()
            item = next(batches["it"])
            waited += time.perf_counter() - t0
            losses = train_step(learner, item, lr_at(train, train.base_lr(), iteration, 0), iteration)
            return len((item[0] if isinstance(item, tuple) else item).records)

        try:
            launch = time.perf_counter()
            for i in range(warmup):
                step(i)
            common.sync(device)
            waited, start = 0.0, time.perf_counter()
            with profiler(device) if profile else contextlib.nullcontext() as prof:
                images = sum(step(warmup + i) for i in range(steps))
                common.sync(device)
            seconds = time.perf_counter() - start
        finally:
            batches.clear()
            del loader
            if isinstance(teacher, OnlineTeacher):
                teacher.model.to("cpu")
        peak = torch.cuda.max_memory_allocated(device) / MB if cuda else None
        result = {"steps": steps, "images": images, "seconds": seconds, "steps_per_s": steps / seconds,
                  "images_per_s": images / seconds, "warmup_seconds": start - launch,
                  "data_wait_ms_per_step": 1000 * waited / steps, "peak_gpu_mb": peak, "last_losses": losses}
        if profile:
            result["phases_ms"] = {"data wait": 1000 * waited / steps, **phase_times(prof, steps, cuda)}
        return result


PHASES = ("teacher", "forward", "losses", "assignment", "gfl_losses", "distillation", "backward", "readout",
          "optimizer")  # the record_function ranges of distill.step and distill.criterion


def profiler(device: torch.device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def phase_times(prof, steps: int, cuda: bool) -> dict[str, float]:
    """ms per step of each phase: wall time on the host (CPU), and on CUDA the device time too."""
    out = {}
    for event in prof.key_averages():
        if event.key in PHASES:
            out[event.key] = event.cpu_time_total / 1000 / steps
            if cuda:
                out[f"{event.key} (gpu)"] = event.device_time_total / 1000 / steps
    return {k: out[k] for k in sorted(out, key=lambda k: PHASES.index(k.split(" ")[0]))}

