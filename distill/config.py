"""Configs of a training run, as data: how to train (TrainConfig) and with which losses (LossConfig);
what to train on is data.config.DataConfig. Frozen dataclasses validated at construction (core.config's rules);
the resolved values are saved as JSON beside every run."""

from __future__ import annotations

from dataclasses import dataclass, replace

from core.config import config_to_dict, param, validate_fields
from core.domains import MAX_SEED, Flag, Ints, OneOf, Range
from core.paths import InputFile
from core.runtime import AMP_MODES, Device
from detector.regions import VLR_IOUS, TeacherNeeds

__all__ = ["LossConfig", "TrainConfig", "config_to_dict"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = param(12, "epochs", Range(1, 100_000))
    batch_size: int = param(16, "images per step (per process under torchrun)", Range(1, 4096))
    lr: float | None = param(None, "learning rate", Range(0, 100, integer=False, low_open=True),
                             shown="0.01 x batch / 16 for sgd, 1e-4 x batch / 16 for adamw")
    optimizer: str = param("sgd", "sgd (the paper's recipe) or adamw (faster from scratch on small data)",
                           OneOf("sgd", "adamw"))
    momentum: float = param(0.9, "SGD momentum", Range(0, 1, integer=False, high_open=True))
    weight_decay: float = param(1e-4, "weight decay", Range(0, 1, integer=False))
    warmup_iters: int = param(500, "linear warm-up steps from warmup_ratio x lr", Range(0, 10**9))
    warmup_ratio: float = param(0.001, "learning rate at step 0 as a fraction of lr",
                                Range(0, 1, integer=False, low_open=True))
    lr_steps: tuple[int, ...] | None = param(None, "epochs after which lr x0.1, e.g. 8,11",
                                             Ints(Range(1, 100_000), "8,11"), shown="8/12 and 11/12 of --epochs")
    max_iters: int | None = param(None, "stop after this many steps", Range(1, 10**12), shown="all epochs")
    seed: int = param(0, "seed of the model init and of the batches", Range(0, MAX_SEED))
    device: str = param("auto", "auto (cuda when available), cpu, cuda or cuda:N", Device())
    amp: str = param("auto", "auto (bf16 on CUDA), off, bf16 or fp16", OneOf(*AMP_MODES))
    workers: int = param(2, "DataLoader worker processes", Range(0, 256))
    log_every: int = param(10, "steps per metrics.jsonl record", Range(1, 10**9))
    checkpoint_every: int | None = param(None, "also checkpoint every N steps", Range(1, 10**12),
                                         shown="each epoch only")
    eval_batch_size: int = param(8, "images per forward when evaluating (equal canvases only, so results do not "
                                    "change); under torchrun every rank evaluates its share", Range(1, 4096))
    eval_every: int | None = param(None, "also evaluate every N epochs: AP curves in metrics.jsonl", Range(1, 100_000),
                                   shown="at the end only")
    group_by: str = param("orientation", "batch images of one orientation (mmdet) or of one padded canvas "
                                         "(students see views exactly as the cached teacher did)",
                          OneOf("orientation", "canvas"))
    backbone_weights: str | None = param(None, "ImageNet weights to start the backbone from, the file its library "
                                               "publishes: torchvision's for resnet, mobilenet_v2 and shufflenet_v2_*, "
                                               "timm's for efficientnet_lite0 (.pth, or .safetensors with pip install "
                                               "'ldcache[backbones]'); or a detector checkpoint (its backbone.*)",
                                         InputFile("weights file"))
    tensorboard: bool = param(True, "also write every scalar of metrics.jsonl to RUN/tensorboard/ (needs the "
                                    "tensorboard package: pip install 'ldcache[tensorboard]')", Flag())

    def __post_init__(self):
        validate_fields(self, "training configuration")

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


# The paper's weights were set on COCO (80 classes) with 2 images per GPU (its official configs:
# 8 GPUs x 2 images). The default normalisations carry them to any batch, world size and class count:
REF_IMAGES_PER_PROCESS = 2  # "image": Main LD and VLR LD are sums per image x 2 = official at 2 images
REF_NUM_CLASSES = 80  # "coco": Main KD sums its per-class KL and divides by 80 = official at 80 classes
# "positive" (an option): sums divided by the positives' count (Main LD) or the VLR weight (VLR LD)
# per image, x the per-image figures of COCO-like annotations at 1333x800 (benchmarks/ld_density.py).
REF_POSITIVES_PER_IMAGE = 57.0
REF_VLR_WEIGHT_PER_IMAGE = 144.0
LD_NORMALIZATIONS = ("image", "official", "positive", "mean")
KD_NORMALIZATIONS = ("coco", "official")
KD_MODES = ("auto", "softmax", "sigmoid")
# The LD temperature, unless given: the paper's 10, except on data whose boxes sit in the first bins of
# the edge distributions (distill/geometry.py). On the two such datasets measured, T = 1 beat plain
# training on every seed; T = 10 did not on one of them (docs/defaults.md: "The LD temperature on small objects").
PAPER_LD_TEMPERATURE = 10.0
SMALL_BOX_LD_TEMPERATURE = 1.0
SMALL_BOX_EDGE_BINS = 1.5  # COCO-like data: 3.5 bins; objects below the finest anchors: under 1
# What each recipe sets; a flag typed (or a TOML value) wins over its recipe.
NO_LD = {"ld_weight": 0.0, "vlr_weight": 0.0, "kd_weight": 0.0}
RECIPES = {
    "paper": {},  # Main KD + Main LD + VLR LD, the LD paper's best
    "mmdet": {"vlr_weight": 0.0, "kd_weight": 0.0, "ld_normalization": "official", "weight_sum_clamp": False},
    # BCKD (ICCV 2023) as its authors configure it: its two terms, no LD term, the GFL task losses kept
    "bckd": {**NO_LD, "bckd_cls_weight": 1.0, "bckd_box_weight": 4.0},
    "none": NO_LD,
}
WEIGHT = Range(0, 10_000, integer=False)  # loss weights
TEMPERATURE = Range(0, 1000, integer=False, low_open=True)
PAPER = {"ld_weight": 0.25, "vlr_weight": 0.25, "kd_weight": 10.0, "bckd_cls_weight": 0.0, "bckd_box_weight": 0.0,
         "ld_normalization": "image", "weight_sum_clamp": True}


@dataclass(frozen=True)
class LossConfig:
    """One weight per loss key, applied in one place (distill.criterion). Distillation terms only
    apply when a teacher (cache or online) is given. A recipe fills the fields left unset."""

    recipe: str = param("paper", "paper (LD: Main KD + Main LD + VLR LD), mmdet (Main LD only, as mmdetection "
                                 "ships it, its normalisation), bckd (BCKD's two terms, no LD term) or none (plain "
                                 "training); typed weights add to or override a recipe", OneOf(*RECIPES))
    qfl_weight: float = param(1.0, "QFL weight", WEIGHT)
    giou_weight: float = param(2.0, "GIoU weight", WEIGHT)
    dfl_weight: float = param(0.25, "DFL weight (the paper notes DFL can be dropped when LD is on)", WEIGHT)
    ld_weight: float = param(None, "Main LD weight: box distributions of the ATSS positives", WEIGHT,
                             shown="0.25; 0 with --recipe none")
    ld_temperature: float = param(None, "LD temperature (Main and VLR)", TEMPERATURE,
                                  shown=f"{PAPER_LD_TEMPERATURE:g}, the paper's; {SMALL_BOX_LD_TEMPERATURE:g} when the "
                                        f"data's positive box edges lie under {SMALL_BOX_EDGE_BINS:g} bins (median)")
    vlr_weight: float = param(None, "VLR LD weight: box distributions of the valuable localization region",
                              WEIGHT,
                              shown="0.25; 0 with --recipe mmdet or none")
    vlr_gamma: float = param(0.25, "VLR band: gamma x thr <= DIoU < thr of a GT's ATSS threshold",
                             Range(0, 1, integer=False))
    vlr_iou: str = param("official", "official (the authors' DIoU variant, intersection / anchor area) or diou",
                         OneOf(*VLR_IOUS))
    kd_weight: float = param(None, "Main KD weight: class logits of the ATSS positives", WEIGHT,
                             shown="10; 0 with --recipe mmdet or none")
    kd_temperature: float = param(2.0, "KD temperature", TEMPERATURE)
    kd_mode: str = param("auto", "softmax over classes (paper), sigmoid (per-class binary KL) or auto (softmax; "
                                 "no Main KD on one-class data, where a softmax is constant)", OneOf(*KD_MODES))
    bckd_cls_weight: float = param(None, "BCKD binary classification KD: every class of every location, the "
                                         "teacher's probability as target, / positives", WEIGHT,
                                   shown="0; 1 with --recipe bckd")
    bckd_box_weight: float = param(None, "BCKD box KD: GIoU of student and teacher boxes at every location, "
                                         "weighted by their largest class disagreement, / positives", WEIGHT,
                                   shown="0; 4 with --recipe bckd")
    ld_normalization: str = param(None, "image (per image x 2: the paper's 2 images per GPU at any batch size), "
                                        "official (sums: grow with images per process), positive (per positive, "
                                        "x COCO's) or mean (/ the GIoU weight sum)",
                                  OneOf(*LD_NORMALIZATIONS), shown="image; official with --recipe mmdet")
    kd_normalization: str = param("coco", "coco (sum over classes / 80: the paper's strength at any class "
                                          "count) or official (mean over classes: 80/C x as strong)",
                                  OneOf(*KD_NORMALIZATIONS))
    weight_sum_clamp: bool = param(None, "GIoU and DFL divide by the positives' weight sum clamped at 1, as GFL "
                                         "(--no-weight-sum-clamp: unclamped, as mmdetection's LD head)", Flag(),
                                   shown="on; off with --recipe mmdet")

    def __post_init__(self):
        if isinstance(self.recipe, str) and self.recipe in RECIPES:
            for name, value in {**PAPER, **RECIPES[self.recipe]}.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        validate_fields(self, "loss configuration")

    @property
    def distills(self) -> bool:
        return self.ld_weight > 0 or self.vlr_weight > 0 or self.kd_weight > 0 or self.bckd

    @property
    def bckd(self) -> bool:
        return self.bckd_cls_weight > 0 or self.bckd_box_weight > 0

    def kd_mode_for(self, num_classes: int) -> str:
        """auto: the softmax KD of the paper; no Main KD on one class (see for_classes)."""
        if self.kd_mode == "auto":
            return "off" if num_classes == 1 else "softmax"
        return self.kd_mode

    def for_classes(self, num_classes: int) -> LossConfig:
        """The losses a run on num_classes classes trains with. With one class there is no relation
        between classes for Main KD to transfer (a softmax over one class is constant, and QFL already
        supervises the one score), and the per-class sigmoid KD made one-class students worse
        (docs/results.md): auto turns Main KD off there; --kd-mode sigmoid keeps it."""
        if self.kd_mode_for(num_classes) == "off" and self.kd_weight > 0:
            return replace(self, kd_weight=0.0)
        return self

    @property
    def effective_ld_temperature(self) -> float:
        """The LD temperature the losses use: the one given or resolved (for_edges), else the paper's."""
        return PAPER_LD_TEMPERATURE if self.ld_temperature is None else self.ld_temperature

    def for_edges(self, median_edge_bins: float | None) -> LossConfig:
        """The LD temperature of a run whose data's positive box edges lie at median_edge_bins (the
        median over the ATSS positives, in bins: distill.geometry), when none was given."""
        if self.ld_temperature is not None:
            return self
        small = median_edge_bins is not None and median_edge_bins < SMALL_BOX_EDGE_BINS
        return replace(self, ld_temperature=SMALL_BOX_LD_TEMPERATURE if small else PAPER_LD_TEMPERATURE)

    def teacher_needs(self) -> TeacherNeeds:
        """What these losses read from a teacher (a term whose weight is 0 reads nothing)."""
        return TeacherNeeds(class_logits=self.kd_weight > 0 or self.bckd,
                            vlr_gamma=self.vlr_gamma if self.vlr_weight > 0 else None, vlr_iou=self.vlr_iou,
                            every_location=self.bckd, box_logits=self.ld_weight > 0 or self.vlr_weight > 0)

    def strength_warnings(self, images_per_process: int, num_classes: int) -> list[str]:
        """One line for each setting that puts a distillation term far from the paper's strength."""
        out = []
        if self.ld_normalization == "official" and (self.ld_weight or self.vlr_weight) and images_per_process > 3:
            out.append(f"--ld-normalization official sums Main LD and VLR LD over the {images_per_process} images "
                       f"of a process: {images_per_process / REF_IMAGES_PER_PROCESS:.1f}x the paper's strength "
                       "(it used 2 per GPU; its authors advise at most 3); --ld-normalization image keeps it")
        if self.kd_weight and self.kd_mode_for(num_classes) == "softmax" and num_classes == 1:
            out.append("softmax Main KD over one class is constant (no signal): use --kd-mode auto (no Main KD "
                       "on one class), --kd-mode sigmoid or --kd-weight 0")
        elif (
            self.kd_weight and self.kd_normalization == "official" and not 2 / 3 <= REF_NUM_CLASSES / num_classes <= 1.5
        ):
            out.append(
                f"--kd-normalization official averages Main KD over {num_classes} classes: "
                f"{REF_NUM_CLASSES / num_classes:.1f}x its strength on COCO's 80; --kd-normalization coco keeps it"
            )
        return out
