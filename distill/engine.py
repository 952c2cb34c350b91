"""The training loop: plain GFL training (teachers, baselines) and, with a teacher source, students.

A run lives in one folder: config.json (resolved configuration), metrics.jsonl (one JSON object per
logged step), checkpoints/last.pt (model, optimizer and position, written atomically every epoch
and every --checkpoint-every steps), eval.json and val_results.json after training. A killed or
interrupted run resumes from last.pt with --resume and replays exactly the batches it had not seen.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from detector.checkpoint import load_backbone_weights, load_state_dict_strict, read_checkpoint, save_checkpoint
from detector.coco import CocoDetection, collate
from detector.distributed import barrier, init_from_env, mean_over_ranks, run_on_main
from detector.config import ModelConfig
from detector.errors import UserError
from detector.evaluation import format_metrics_table, save_results
from detector.inference import evaluate_model
from detector.model import build_detector
from detector.runtime import autocast_for, resolve_device
from detector.views import ViewSpec, parse_views
from distill.config import DataConfig, LossConfig, TrainConfig, config_to_dict
from distill.criterion import compute_losses
from distill.sampler import ViewBatchSampler

# Settings that may differ when a run is resumed: they change how, not what, is trained.
RESUMABLE_CHANGES = {"max_iters", "workers", "device", "amp", "log_every", "checkpoint_every", "eval_batch_size",
                     "eval_every"}


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def results(self) -> Path:
        return self.root / "val_results.json"


def lr_at(cfg: TrainConfig, base_lr: float, iteration: int, epoch: int) -> float:
    """Linear warm-up by iteration, then x0.1 after each step epoch (mmdetection's 1x schedule)."""
    warm = 1.0
    if iteration < cfg.warmup_iters:
        warm = cfg.warmup_ratio + (1 - cfg.warmup_ratio) * iteration / cfg.warmup_iters
    decay = 0.1 ** sum(epoch >= s for s in cfg.resolved_lr_steps())
    return base_lr * warm * decay


def batch_groups(dataset: CocoDetection, group_by: str) -> list[list]:
    """The sampler's group of every (image, view): orientation or padded canvas."""
    if group_by == "canvas":
        return [[dataset.view_record(i, v).padded_hw for v in range(len(dataset.views))] for i in range(len(dataset))]
    return [[dataset.orig_hw(i)[1] >= dataset.orig_hw(i)[0]] * len(dataset.views) for i in range(len(dataset))]


def build_optimizer(cfg: TrainConfig, params, world_size: int = 1) -> torch.optim.Optimizer:
    lr = cfg.base_lr(world_size)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_train_dataset(data: DataConfig, strides) -> CocoDetection:
    views = parse_views(data.views, data.img_scale, data.extra_scales)
    return CocoDetection(data.images, data.ann, views=views, strides=strides, train=True)


def build_val_dataset(data: DataConfig, strides) -> CocoDetection | None:
    if data.val_ann is None:
        return None
    return CocoDetection(data.val_images, data.val_ann, views=[ViewSpec(False, data.img_scale)], strides=strides,
                         train=False)


def _resolved_config(data, model_cfg, train, loss, dataset, extra) -> dict:
    return {
        "data": config_to_dict(data),
        "model": model_cfg.to_dict(),
        "train": config_to_dict(train),
        "loss": config_to_dict(loss),
        "dataset": {"num_images": len(dataset), "ann_sha256": dataset.ann_sha256, "class_names": dataset.class_names},
        **(extra or {}),
    }


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b and key not in RESUMABLE_CHANGES:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _prepare_run_dir(paths: RunPaths, config: dict, resume: bool) -> dict | None:
    """Refuse to overwrite a run; on resume check the configuration and return the checkpoint."""
    if paths.last.exists() and not resume:
        raise UserError(f"{paths.root} already holds a training run; pass --resume to continue it or choose another --out")
    ckpt = None
    if resume and paths.last.exists():
        old = json.loads(paths.config.read_text()) if paths.config.exists() else {}
        diffs = _config_differences(old, config)
        if diffs:
            raise UserError(f"cannot resume {paths.root}: its configuration differs ({'; '.join(diffs[:4])}); "
                            "use the original options or another --out")
        ckpt = read_checkpoint(paths.last)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(json.dumps(config, indent=2) + "\n")
    return ckpt


def _truncate_metrics(path: Path, last_iter: int) -> None:
    """Drop records beyond the resumed position so a resumed run does not log steps twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["iter"] <= last_iter]
    path.write_text("".join(line + "\n" for line in kept))


def run_train(data: DataConfig, model_cfg: ModelConfig, train: TrainConfig, loss: LossConfig, out, resume: bool = False,
              progress: bool = True, extra_config: dict | None = None, dataset: CocoDetection | None = None,
              teacher=None) -> dict:
    """Train, checkpoint, evaluate. Returns {"metrics": COCO metrics or None, "iter", "train_seconds"}.
    `dataset` may be passed when the caller already built the training set from `data`. `teacher`
    (a distill.teachers.TeacherSource: a cache or an online teacher) adds the distillation losses."""
    paths = RunPaths(Path(out))
    dist_info = init_from_env(train.device)  # torchrun: one process per GPU (or CPU worker)
    device = resolve_device(train.device, dist_info.local_rank if dist_info.enabled else None)
    main = dist_info.is_main
    progress = progress and main
    dataset = dataset or build_train_dataset(data, model_cfg.strides)
    if dataset.num_classes != model_cfg.num_classes:
        raise UserError(f"the model has {model_cfg.num_classes} classes but {data.ann} has {dataset.num_classes}; "
                        "pass --num-classes to match or use the matching annotation file")
    val_dataset = build_val_dataset(data, model_cfg.strides)
    for ds in (dataset, val_dataset):
        if ds is not None:
            ds.check_files()
    extra_config = dict(extra_config or {})
    collate_fn, train_dataset = collate, dataset
    if teacher is not None:
        teacher.validate(dataset, model_cfg, loss.teacher_needs())  # before step 1, not at step 1000
        collate_fn, train_dataset = teacher.collate, teacher.dataset(dataset, loss.teacher_needs())
        extra_config["teacher"] = teacher.describe()
    config = _resolved_config(data, model_cfg, train, loss, dataset, extra_config)
    config["world_size"] = dist_info.world_size  # the global batch is batch_size x world_size
    resuming = run_on_main(lambda: _prepare_run_dir(paths, config, resume) is not None, dist_info)
    ckpt = read_checkpoint(paths.last) if resuming else None

    torch.manual_seed(train.seed)
    model = build_detector(model_cfg)
    if train.backbone_weights and ckpt is None:
        load_backbone_weights(model, train.backbone_weights)
    if ckpt is not None:
        load_state_dict_strict(model, ckpt["state_dict"], source=f"checkpoint {paths.last}")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(train, params, dist_info.world_size)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and train.amp == "fp16")
    net = model
    if dist_info.enabled:  # gradients averaged over ranks; loss normalisers are averaged in the criterion
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = ViewBatchSampler(batch_groups(dataset, train.group_by), batch_size=train.batch_size, seed=train.seed,
                               rank=dist_info.rank, world_size=dist_info.world_size)
    per_epoch = sampler.batches_per_epoch()
    total_iters = per_epoch * train.epochs
    if train.max_iters is not None:
        total_iters = min(total_iters, train.max_iters)

    epoch, batch_in_epoch, iteration, train_seconds = 0, 0, 0, 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, batch_in_epoch, iteration = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["iter"]
        train_seconds = ckpt.get("train_seconds", 0.0)
        if main:
            _truncate_metrics(paths.metrics, iteration)
    elif main and paths.metrics.exists():
        paths.metrics.unlink()  # a run that never reached its first checkpoint starts over

    def save(ep: int, b: int) -> None:
        if b >= per_epoch:
            ep, b = ep + 1, 0
        if main:  # one writer; every rank holds the same weights
            save_checkpoint(paths.last, model, model_cfg, optimizer=optimizer.state_dict(), epoch=ep, batch_in_epoch=b,
                            iter=iteration, train_seconds=train_seconds, run_config=config)

    loader_kwargs = dict(num_workers=train.workers, collate_fn=collate_fn, pin_memory=device.type == "cuda",
                         persistent_workers=False)
    model.train()
    window: dict[str, float] = {}
    window_steps = 0
    bar = tqdm(total=total_iters, initial=min(iteration, total_iters), desc="train", unit="it", disable=not progress,
               dynamic_ncols=True)
    metrics_file = paths.metrics.open("a") if main else open(os.devnull, "w")
    try:
        while iteration < total_iters and epoch < train.epochs:
            sampler.set_epoch(epoch, batch_in_epoch)
            loader = torch.utils.data.DataLoader(train_dataset, batch_sampler=sampler, **loader_kwargs)
            for item in loader:
                batch, stored = item if isinstance(item, tuple) else (item, None)
                step_start = time.perf_counter()
                lr = lr_at(train, train.base_lr(dist_info.world_size), iteration, epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                teacher_rows = teacher.rows(batch, stored, device) if teacher is not None else None
                with autocast_for(device, train.amp):
                    cls_out, box_out = net(batch.images.to(device, non_blocking=True))
                losses = compute_losses(
                    cls_out, box_out, [r.level_hw for r in batch.records],
                    [b.to(device) for b in batch.boxes], [lab.to(device) for lab in batch.labels],
                    loss, model_cfg.num_classes, model_cfg.reg_max, model_cfg.strides, teacher_rows,
                )
                if not torch.isfinite(losses["loss"]):
                    raise UserError(f"the loss became {float(losses['loss'])} at step {iteration + 1} "
                                    f"({', '.join(f'{k}={float(v):.4g}' for k, v in losses.items())}); lower --lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                scaler.step(optimizer)
                scaler.update()
                iteration += 1
                batch_in_epoch += 1
                train_seconds += time.perf_counter() - step_start

                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + float(v.detach())
                window_steps += 1
                if iteration % train.log_every == 0 or iteration == total_iters:
                    means = mean_over_ranks({k: v / window_steps for k, v in window.items()})
                    record = {"iter": iteration, "epoch": epoch + batch_in_epoch / per_epoch, "lr": lr, **means,
                              "train_seconds": round(train_seconds, 3)}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    window, window_steps = {}, 0
                bar.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
                if train.checkpoint_every and iteration % train.checkpoint_every == 0:
                    save(epoch, batch_in_epoch)
                if iteration >= total_iters:
                    break
            if batch_in_epoch >= per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            save(epoch, batch_in_epoch)
            if (main and val_dataset is not None and train.eval_every and batch_in_epoch == 0
                    and epoch % train.eval_every == 0 and iteration < total_iters):
                metrics, _ = evaluate_model(model, val_dataset, device, train.eval_batch_size, train.workers, train.amp,
                                            progress=False)
                metrics_file.write(json.dumps({"iter": iteration, "epoch": epoch, **metrics}) + "\n")
                metrics_file.flush()
                model.train()
    except KeyboardInterrupt:
        save(epoch, batch_in_epoch)
        raise
    finally:
        bar.close()
        metrics_file.close()

    barrier()
    metrics = None
    if main and val_dataset is not None:
        metrics, results = evaluate_model(model, val_dataset, device, train.eval_batch_size, train.workers, train.amp,
                                          progress=progress)
        save_results(paths.results, results)
        with paths.metrics.open("a") as f:  # the last point of the AP curve
            f.write(json.dumps({"iter": iteration, "epoch": iteration / max(per_epoch, 1), **metrics}) + "\n")
        paths.eval.write_text(json.dumps({"metrics": metrics, "iter": iteration, "train_seconds": train_seconds,
                                          "checkpoint": str(paths.last)}, indent=2) + "\n")
        if progress:
            print(format_metrics_table(metrics))
    return {"metrics": metrics, "iter": iteration, "train_seconds": train_seconds}
