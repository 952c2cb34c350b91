"""The training loop: plain GFL training (teachers, baselines) and, with a teacher source, students.

Set-up (datasets, the teacher source checked before step 1, the run folder, model, optimizer,
DDP), then epochs of train_step over the seeded batches with logging and checkpoints
(distill/run_dir.py has the folder's rules), then the evaluation. A killed or interrupted run
resumes from checkpoints/last.pt with --resume and replays exactly the batches it had not seen.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.distributed import DistInfo, barrier, init_from_env, mean_over_ranks, run_on_main
from core.errors import UserError
from core.paths import write_atomically
from core.runtime import progress_bar, resolve_device
from data.builders import build_train_dataset, build_val_dataset
from data.coco import CocoDetection, collate
from data.config import DataConfig
from data.sampler import ViewBatchSampler, batch_groups
from detector.checkpoint import load_backbone_weights, load_state_dict_strict, read_checkpoint, save_checkpoint
from detector.config import ModelConfig
from detector.evaluation import format_metrics_table, save_results
from detector.inference import evaluate_model
from detector.model import build_detector
from distill.config import LossConfig, TrainConfig
from distill.criterion import build_criterion
from distill.policy import resolve_loss_policy
from distill.run_dir import (
    MetricsLog,
    RunPaths,
    default_config,
    evaluated_at,
    prepare_run_dir,
    resolved_config,
    tensorboard_available,
    truncate_metrics,
)
from distill.step import Learner, train_step
from distill.teachers import TeacherSource


def lr_at(cfg: TrainConfig, base_lr: float, iteration: int, epoch: int) -> float:
    """Linear warm-up by iteration, then x0.1 after each step epoch (mmdetection's 1x schedule)."""
    warm = 1.0
    if iteration < cfg.warmup_iters:
        warm = cfg.warmup_ratio + (1 - cfg.warmup_ratio) * iteration / cfg.warmup_iters
    decay = 0.1 ** sum(epoch >= s for s in cfg.resolved_lr_steps())
    return base_lr * warm * decay


def build_optimizer(cfg: TrainConfig, params, world_size: int = 1) -> torch.optim.Optimizer:
    lr = cfg.base_lr(world_size)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass
class Position:
    """Where a run is: saved in every checkpoint, restored on resume."""

    epoch: int = 0
    batch_in_epoch: int = 0
    iteration: int = 0
    train_seconds: float = 0.0


@dataclass
class Training:
    """Everything the loop needs, built once by run_train."""

    paths: RunPaths
    train: TrainConfig
    learner: Learner
    model: torch.nn.Module  # unwrapped (DDP wraps it in learner.net)
    sampler: ViewBatchSampler
    loader_kwargs: dict
    train_dataset: torch.utils.data.Dataset
    val_dataset: CocoDetection | None
    config: dict
    dist: DistInfo
    per_epoch: int
    total_iters: int
    resuming: bool  # a checkpoint of this run exists and --resume was given

    def save(self, pos: Position) -> None:
        epoch, b = (pos.epoch + 1, 0) if pos.batch_in_epoch >= self.per_epoch else (pos.epoch, pos.batch_in_epoch)
        if self.dist.is_main:  # one writer; every rank holds the same weights
            save_checkpoint(self.paths.last, self.model, self.model.config,
                            optimizer=self.learner.optimizer.state_dict(), scaler=self.learner.scaler.state_dict(),
                            epoch=epoch, batch_in_epoch=b,
                            iter=pos.iteration, train_seconds=pos.train_seconds, run_config=self.config)

    def evaluate(self, progress: bool) -> tuple[dict, list[dict]]:
        t = self.train
        metrics, results = evaluate_model(self.model, self.val_dataset, self.learner.device, t.eval_batch_size,
                                          t.workers, t.amp, progress=progress)
        self.model.train()
        return metrics, results


def run_train(data: DataConfig, model_cfg: ModelConfig, train: TrainConfig, loss: LossConfig, out, resume: bool = False,
              progress: bool = True, extra_config: dict | None = None, dataset: CocoDetection | None = None,
              teacher: TeacherSource | None = None) -> dict:
    """Train, checkpoint, evaluate. Returns {"metrics": COCO metrics or None, "iter", "train_seconds"}.
    `dataset` may be passed when the caller already built the training set from `data`. `teacher`
    (a distill.teachers.TeacherSource: a cache or an online teacher) adds the distillation losses."""
    data = data.resolve()  # a caller in code may leave fields out: their defaults (idempotent when resolved)
    dist_info = init_from_env(train.device)  # torchrun: one process per GPU (or CPU worker)
    run = build_training(data, model_cfg, train, loss, Path(out), resume, extra_config, dataset, teacher, dist_info)
    pos = restore(run)
    progress = progress and dist_info.is_main
    bar = progress_bar(total=run.total_iters, initial=min(pos.iteration, run.total_iters), desc="train", unit="it",
               disable=not progress, dynamic_ncols=True)
    tensorboard = train.tensorboard and tensorboard_available()
    if train.tensorboard and not tensorboard and dist_info.is_main:
        print("note: the tensorboard package is not installed (pip install 'ldcache[tensorboard]'): scalars go to "
              "metrics.jsonl only", file=sys.stderr)
    log = MetricsLog(run.paths.metrics, dist_info.is_main, run.paths.tensorboard if tensorboard else None,
                     purge_step=pos.iteration + 1 if run.resuming else None)
    try:
        if run.resuming and evaluation_due(run, pos):  # killed during the evaluation after its checkpoint
            barrier()  # every rank reads what rank 0 truncated, and decides alike
            if not evaluated_at(run.paths.metrics, pos.iteration):
                periodic_evaluation(run, pos, log)
        train_epochs(run, pos, log, bar)
        barrier()
        metrics = final_evaluation(run, pos, progress, log) if run.val_dataset is not None else None
    except KeyboardInterrupt:
        run.save(pos)
        raise
    except UserError:
        if run.paths.last.exists():  # an unreadable image mid-run: keep the steps since the checkpoint for --resume
            run.save(pos)
        raise
    finally:
        bar.close()
        log.close()
    return {"metrics": metrics, "iter": pos.iteration, "train_seconds": pos.train_seconds}


def build_training(data, model_cfg, train, loss, out: Path, resume, extra_config, dataset, teacher,
                   dist_info: DistInfo) -> Training:
    device = resolve_device(train.device, dist_info.local_rank if dist_info.enabled else None)
    dataset = dataset or build_train_dataset(data, model_cfg.strides)
    if dataset.num_classes != model_cfg.num_classes:
        raise UserError(f"the model has {model_cfg.num_classes} classes but {data.ann} has {dataset.num_classes}; "
                        "pass --num-classes to match or use the matching annotation file")
    val_dataset = build_val_dataset(data, model_cfg.strides)
    if val_dataset is not None and dataset.cat_ids != val_dataset.cat_ids and (
            dataset.class_names != val_dataset.class_names):
        # a label is an index into the sorted categories: other categories would score each class as another
        only_val = sorted(set(val_dataset.cat_ids) - set(dataset.cat_ids))
        only_train = sorted(set(dataset.cat_ids) - set(val_dataset.cat_ids))
        raise UserError(f"the validation annotations {data.val_ann} do not list the categories of the training "
                        f"annotations {data.ann} (category ids only in validation: {only_val[:10]}, only in "
                        f"training: {only_train[:10]}); pass the validation split of the same dataset")
    for ds in (dataset, val_dataset):
        if ds is not None:
            ds.check_files()
    collate_fn, train_dataset = collate, dataset
    policy = resolve_loss_policy(loss, model_cfg, dataset, train.batch_size, teacher is not None)
    loss, teacher = policy.loss, teacher if policy.distills else None
    extra_config = {**(extra_config or {}), **policy.recorded}
    if dist_info.is_main:
        for line in policy.notes:
            print(f"note: {line}", file=sys.stderr)
        for line in policy.warnings:
            print(f"warning: {line}", file=sys.stderr)
    if teacher is not None:
        teacher.validate(dataset, model_cfg, loss.teacher_needs())  # before step 1, not at step 1000
        teacher = teacher.to(device)  # the student's device: under torchrun this rank's own GPU
        collate_fn, train_dataset = teacher.collate, teacher.dataset(dataset, loss.teacher_needs())
        extra_config["teacher"] = teacher.describe()
    config = resolved_config(data, model_cfg, train, loss, dataset, extra_config)
    config["world_size"] = dist_info.world_size  # the global batch is batch_size x world_size
    paths = RunPaths(out)
    resuming = run_on_main(lambda: prepare_run_dir(paths, config, resume, default_config()), dist_info)

    torch.manual_seed(train.seed)
    model = build_detector(model_cfg)
    if train.backbone_weights and not resuming:
        load_backbone_weights(model, train.backbone_weights)
    model.to(device).train()  # train() applies frozen stages and norm_eval (ResNet.train)
    optimizer = build_optimizer(train, [p for p in model.parameters() if p.requires_grad], dist_info.world_size)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and train.amp == "fp16")
    net = model
    if dist_info.enabled:  # gradients averaged over ranks; loss normalisers are averaged in the criterion
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = ViewBatchSampler(batch_groups(dataset, train.group_by), batch_size=train.batch_size, seed=train.seed,
                               rank=dist_info.rank, world_size=dist_info.world_size)
    per_epoch = sampler.batches_per_epoch()
    total_iters = (
        per_epoch * train.epochs if train.max_iters is None else min(per_epoch * train.epochs, train.max_iters)
    )
    learner = Learner(net, optimizer, scaler, build_criterion(loss, model_cfg), device, train.amp, teacher)
    loader_kwargs = dict(num_workers=train.workers, collate_fn=collate_fn, pin_memory=device.type == "cuda",
                         persistent_workers=False)
    return Training(paths, train, learner, model, sampler, loader_kwargs, train_dataset, val_dataset, config,
                    dist_info, per_epoch, total_iters, resuming)


def restore(run: Training) -> Position:
    """The position (and weights and optimizer state) of the run folder's checkpoint, if any."""
    paths, main = run.paths, run.dist.is_main
    if not run.resuming:
        if main and paths.metrics.exists():
            paths.metrics.unlink()  # a run that never reached its first checkpoint starts over
        return Position()
    ckpt = read_checkpoint(paths.last)
    load_state_dict_strict(run.model, ckpt["state_dict"], source=f"checkpoint {paths.last}")
    run.learner.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and run.learner.scaler.is_enabled():  # fp16 on CUDA: the loss scale it had reached
        run.learner.scaler.load_state_dict(ckpt["scaler"])
    pos = Position(ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["iter"], ckpt.get("train_seconds", 0.0))
    if main:  # a finished run evaluates again (final_evaluation): its earlier record goes
        finished = pos.iteration >= run.total_iters or pos.epoch >= run.train.epochs
        truncate_metrics(paths.metrics, pos.iteration, redo_evaluation=finished and run.val_dataset is not None)
    return pos


def train_epochs(run: Training, pos: Position, log: MetricsLog, bar) -> None:
    t, world = run.train, run.dist.world_size
    window: dict[str, float] = {}
    window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
    while pos.iteration < run.total_iters and pos.epoch < t.epochs:
        run.sampler.set_epoch(pos.epoch, pos.batch_in_epoch)
        loader = torch.utils.data.DataLoader(run.train_dataset, batch_sampler=run.sampler, **run.loader_kwargs)
        waiting = time.perf_counter()
        for item in loader:
            step_start = time.perf_counter()
            window_wait += step_start - waiting  # the loader not keeping up
            lr = lr_at(t, t.base_lr(world), pos.iteration, pos.epoch)
            losses = train_step(run.learner, item, lr, pos.iteration)
            pos.iteration += 1
            pos.batch_in_epoch += 1
            pos.train_seconds += time.perf_counter() - step_start
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
            if pos.iteration % t.log_every == 0 or pos.iteration == run.total_iters:
                means = mean_over_ranks({k: v / window_steps for k, v in window.items()})
                wall = time.perf_counter() - window_start
                log.write({"iter": pos.iteration, "epoch": pos.epoch + pos.batch_in_epoch / run.per_epoch, "lr": lr,
                           **means, "train_seconds": round(pos.train_seconds, 3),
                           "steps_per_s": round(window_steps / max(wall, 1e-9), 4),
                           "data_wait_ms": round(1000 * window_wait / window_steps, 2)})
                window, window_steps, window_wait, window_start = {}, 0, 0.0, time.perf_counter()
            bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if t.checkpoint_every and pos.iteration % t.checkpoint_every == 0:
                run.save(pos)
            if pos.iteration >= run.total_iters:
                break
            waiting = time.perf_counter()
        if pos.batch_in_epoch >= run.per_epoch:
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        run.save(pos)
        if evaluation_due(run, pos):
            periodic_evaluation(run, pos, log)


def evaluation_due(run: Training, pos: Position) -> bool:
    """--eval-every: an AP curve point at this epoch's end (the last one is the final evaluation)."""
    t = run.train
    return bool(run.val_dataset is not None and t.eval_every and pos.batch_in_epoch == 0 and pos.epoch > 0
                and pos.epoch % t.eval_every == 0 and pos.iteration < run.total_iters)


def periodic_evaluation(run: Training, pos: Position, log: MetricsLog) -> None:
    metrics, _ = run.evaluate(progress=False)  # every rank its share; rank 0 the metrics
    if metrics is not None:
        log.write({"iter": pos.iteration, "epoch": pos.epoch, **metrics})


def final_evaluation(run: Training, pos: Position, progress: bool, log: MetricsLog) -> dict | None:
    """COCO metrics on the validation set: val_results.json, eval.json, the AP curve's last point."""
    metrics, results = run.evaluate(progress)  # every rank its share; rank 0 the metrics
    if metrics is None:
        return None
    paths = run.paths
    save_results(paths.results, results)
    log.write({"iter": pos.iteration, "epoch": pos.iteration / max(run.per_epoch, 1), **metrics})
    # atomically: a sweep or the demo takes an eval.json for a finished run, and reads it
    write_atomically(paths.eval, json.dumps({"metrics": metrics, "iter": pos.iteration,
                                             "train_seconds": pos.train_seconds, "checkpoint": str(paths.last)},
                                            indent=2) + "\n")
    if progress:
        print(format_metrics_table(metrics))
    return metrics
