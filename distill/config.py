"""Configs of a training run, as data: what to train on (DataConfig), how (TrainConfig) and with
which losses (LossConfig). Frozen dataclasses validated at construction; the resolved values are
saved as JSON beside every run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from detector.errors import UserError
from detector.regions import TeacherNeeds
from detector.views import DEFAULT_IMG_SCALE


def _check(problems: list[str], what: str) -> None:
    if problems:
        raise UserError(f"invalid {what}: " + "; ".join(problems))


@dataclass(frozen=True)
class DataConfig:
    images: str  # folder of training images
    ann: str  # COCO annotation json of the training images
    val_images: str | None = None  # evaluated after training when given
    val_ann: str | None = None
    img_scale: tuple[int, int] = DEFAULT_IMG_SCALE  # (long, short) keep-ratio fit
    views: str = "orig,hflip"  # views an image may be shown as; one is drawn per image per epoch
    extra_scales: tuple[tuple[int, int], ...] = ()  # more (long, short) scales, each with the views above

    def __post_init__(self):
        object.__setattr__(self, "img_scale", tuple(int(v) for v in self.img_scale))
        object.__setattr__(self, "extra_scales", tuple(tuple(int(v) for v in s) for s in self.extra_scales))
        problems = []
        if len(self.img_scale) != 2 or not self.img_scale[0] >= self.img_scale[1] > 0:
            problems.append(f"img_scale must be LONG,SHORT with LONG >= SHORT > 0, got {self.img_scale}")
        if (self.val_images is None) != (self.val_ann is None):
            problems.append("give both val_images and val_ann, or neither")
        _check(problems, "data configuration")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 16  # images per step (per process under torchrun)
    lr: float | None = None  # None: 0.01 x total batch / 16 (SGD), the 1x recipe scaled linearly
    optimizer: str = "sgd"  # sgd (the paper's recipe) or adamw (faster from scratch on small data)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500  # linear warm-up from warmup_ratio x lr
    warmup_ratio: float = 0.001
    lr_steps: tuple[int, ...] | None = None  # epochs after which lr x 0.1; None: 8 and 11 of 12, scaled
    max_iters: int | None = None  # stop after this many steps (tests, smoke runs)
    seed: int = 0
    device: str = "auto"  # auto = cuda when available
    amp: str = "auto"  # auto = bf16 autocast on CUDA, off on CPU; or off, bf16, fp16
    workers: int = 2  # DataLoader worker processes
    log_every: int = 10  # steps between metrics.jsonl records
    checkpoint_every: int | None = None  # also save last.pt every N steps (long epochs)
    eval_batch_size: int = 1
    eval_every: int | None = None  # also evaluate every N epochs (AP curves in metrics.jsonl)
    group_by: str = "orientation"  # batch images of one orientation (mmdet) or of one padded canvas
    backbone_weights: str | None = None  # torchvision ResNet (ImageNet) weights to start the backbone from

    def __post_init__(self):
        if self.lr_steps is not None:
            object.__setattr__(self, "lr_steps", tuple(int(s) for s in self.lr_steps))
        problems = []
        for name in ("epochs", "batch_size", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.warmup_iters < 0 or not 0 < self.warmup_ratio <= 1:
            problems.append("warmup_iters must be >= 0 and warmup_ratio in (0, 1]")
        if self.max_iters is not None and self.max_iters < 1:
            problems.append(f"max_iters must be >= 1, got {self.max_iters}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.group_by not in ("orientation", "canvas"):
            problems.append(f"group_by must be orientation or canvas, got {self.group_by!r}")
        if self.optimizer not in ("sgd", "adamw"):
            problems.append(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            problems.append(f"amp must be auto, off, bf16 or fp16, got {self.amp!r}")
        if self.eval_every is not None and self.eval_every < 1:
            problems.append(f"eval_every must be >= 1, got {self.eval_every}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(problems, "training configuration")

    def base_lr(self, world_size: int = 1) -> float:
        if self.lr is not None:
            return self.lr
        if self.optimizer == "adamw":
            return 1e-4 * self.batch_size * world_size / 16
        return 0.01 * self.batch_size * world_size / 16

    def resolved_lr_steps(self) -> tuple[int, ...]:
        if self.lr_steps is not None:
            return self.lr_steps
        # The 1x schedule decays after epochs 8 and 11 of 12; keep those fractions for other lengths.
        return tuple(sorted({max(1, round(self.epochs * 8 / 12)), max(1, round(self.epochs * 11 / 12))}))


LD_NORMALIZATIONS = ("official", "mean")


@dataclass(frozen=True)
class LossConfig:
    """One weight per loss key, applied in one place (distill.criterion). Distillation terms only
    apply when a teacher (cache or online) is given; the defaults are the paper's full recipe."""

    qfl_weight: float = 1.0
    giou_weight: float = 2.0
    dfl_weight: float = 0.25  # the paper notes DFL can be dropped when LD is on
    ld_weight: float = 0.25  # Main LD: box distributions of the ATSS positives
    ld_temperature: float = 10.0
    vlr_weight: float = 0.25  # VLR LD: box distributions of the valuable localization region
    vlr_gamma: float = 0.25  # band: gamma x thr_g <= DIoU < thr_g
    vlr_iou: str = "official"  # official (the authors' DIoU variant) or diou
    kd_weight: float = 10.0  # Main KD: class logits of the ATSS positives
    kd_temperature: float = 2.0
    kd_mode: str = "softmax"  # softmax over classes (paper) or sigmoid (per-class binary; one-class data)
    # official: LD terms are sums, as the paper's code (grows with images per process; the authors
    # advise <= 3 per GPU). mean: divided by the GIoU weight sum, independent of the batch size.
    ld_normalization: str = "official"

    def __post_init__(self):
        problems = [f"{f.name} must be >= 0" for f in fields(self)
                    if isinstance(getattr(self, f.name), float) and getattr(self, f.name) < 0]
        for name in ("ld_temperature", "kd_temperature"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if not 0 <= self.vlr_gamma <= 1:
            problems.append(f"vlr_gamma must be in [0, 1], got {self.vlr_gamma}")
        if self.vlr_iou not in ("official", "diou"):
            problems.append(f"vlr_iou must be official or diou, got {self.vlr_iou!r}")
        if self.kd_mode not in ("softmax", "sigmoid"):
            problems.append(f"kd_mode must be softmax or sigmoid, got {self.kd_mode!r}")
        if self.ld_normalization not in LD_NORMALIZATIONS:
            problems.append(f"ld_normalization must be one of {LD_NORMALIZATIONS}, got {self.ld_normalization!r}")
        _check(problems, "loss configuration")

    def teacher_needs(self) -> TeacherNeeds:
        """What these losses read from a teacher (a term whose weight is 0 reads nothing)."""
        return TeacherNeeds(class_logits=self.kd_weight > 0, vlr_gamma=self.vlr_gamma if self.vlr_weight > 0 else None,
                            vlr_iou=self.vlr_iou)


def config_to_dict(config) -> dict:
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {k: plain(v) for k, v in asdict(config).items()}
