"""All training losses of a batch with one weight per key, applied here and nowhere else.

The student's head outputs are flattened into rows (each image's own locations: the cache's row
order), ATSS assigns them, the GFL task losses follow, and, with teacher rows aligned to the
student's, the full LD recipe: Main LD (box distributions of the ATSS positives, weighted by the
student's score w_i), VLR LD (box distributions of the valuable localization region, weighted by
IoU) and Main KD (class logits of the positives); and BCKD's two terms at every location (binary
classification KD, and GIoU between student and teacher boxes weighted by their class
disagreement). Every value returned is weighted; "loss" is their sum."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from core.distributed import reduce_mean
from core.errors import UserError
from detector.atss import BatchAssignment, assign_batch
from detector.box_ops import aligned_giou, distance_to_box
from detector.distributions import integral
from detector.gfl_loss import GFLLossOutput, gfl_losses
from detector.priors import anchor_centres
from detector.regions import vlr_region
from detector.rows import flatten_rows
from distill.config import (
    REF_IMAGES_PER_PROCESS,
    REF_NUM_CLASSES,
    REF_POSITIVES_PER_IMAGE,
    REF_VLR_WEIGHT_PER_IMAGE,
    LossConfig,
)
from distill.losses import bckd_box_weights, bckd_cls_loss, distill_kl, sigmoid_kl

LOSS_KEYS = ("loss_qfl", "loss_giou", "loss_dfl", "loss_ld", "loss_ld_vlr", "loss_kd", "loss_bckd_cls",
             "loss_bckd_box")


@dataclass(frozen=True)
class Criterion:
    """Every loss of a run, built once from its configs (build_criterion): the resolved losses and
    the model geometry they need. Called on a step's head outputs, batch and teacher rows."""

    loss: LossConfig
    num_classes: int
    reg_max: int
    strides: tuple[int, ...]

    def __call__(self, cls_out: list[torch.Tensor], box_out: list[torch.Tensor], batch, device: torch.device,
                 teacher_rows=None) -> dict[str, torch.Tensor]:
        return compute_losses(cls_out, box_out, [r.level_hw for r in batch.records],
                              [b.to(device) for b in batch.boxes], [lab.to(device) for lab in batch.labels],
                              self.loss, self.num_classes, self.reg_max, self.strides, teacher_rows)


def build_criterion(loss: LossConfig, model_cfg) -> Criterion:
    """The criterion of a model trained with these (resolved: distill.policy) losses."""
    return Criterion(loss, model_cfg.num_classes, model_cfg.reg_max, tuple(model_cfg.strides))


def compute_losses(cls_logits_per_level: list[torch.Tensor], box_logits_per_level: list[torch.Tensor],
                   level_hw_per_image: list[tuple], gt_boxes_per_image: list[torch.Tensor],
                   gt_labels_per_image: list[torch.Tensor], cfg: LossConfig, num_classes: int,
                   reg_max: int, strides: tuple[int, ...],
                   teacher_rows: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
    """teacher_rows: (box [N, 4(n+1)], cls [N, C] or None) or detector.rows.TeacherRows, row-aligned
    with the student's rows. -> {"loss_qfl", "loss_giou", "loss_dfl"(, "loss_ld", "loss_ld_vlr",
    "loss_kd", "loss_bckd_cls", "loss_bckd_box"), "loss"}; the BCKD keys only when a BCKD weight is set."""
    cls_rows = flatten_rows(cls_logits_per_level, level_hw_per_image)  # [N, C]
    box_rows = flatten_rows(box_logits_per_level, level_hw_per_image)  # [N, 4(n+1)]
    with record_function("assignment"):
        assign = assign_batch(level_hw_per_image, gt_boxes_per_image, gt_labels_per_image, strides, num_classes)
    with record_function("gfl_losses"):
        gfl = gfl_losses(cls_rows, box_rows, assign, reg_max, cfg.weight_sum_clamp)
    weighted = {
        "loss_qfl": cfg.qfl_weight * gfl.losses["loss_qfl"],
        "loss_giou": cfg.giou_weight * gfl.losses["loss_giou"],
        "loss_dfl": cfg.dfl_weight * gfl.losses["loss_dfl"],
    }
    if teacher_rows is not None:
        teacher_box, teacher_cls = teacher_rows[0], teacher_rows[1]
        holes = getattr(teacher_rows, "holes", True)  # a plain tuple may hold anything: check
        if teacher_box.shape[0] != box_rows.shape[0]:
            raise UserError(f"teacher rows ({teacher_box.shape[0]}) do not line up with the student's "
                            f"({box_rows.shape[0]}); the cache and the run lay out views differently")
        with record_function("distillation"):
            terms = distillation_losses(cls_rows, box_rows, teacher_box, teacher_cls, assign, gfl, cfg, reg_max,
                                        num_classes, holes)
        weighted["loss_ld"] = cfg.ld_weight * terms["loss_ld"]
        weighted["loss_ld_vlr"] = cfg.vlr_weight * terms["loss_ld_vlr"]
        weighted["loss_kd"] = cfg.kd_weight * terms["loss_kd"]
        if cfg.bckd:
            with record_function("bckd"):
                bckd = bckd_losses(cls_rows, box_rows, teacher_rows, assign, gfl, cfg, reg_max, holes)
            weighted["loss_bckd_cls"] = cfg.bckd_cls_weight * bckd["loss_bckd_cls"]
            weighted["loss_bckd_box"] = cfg.bckd_box_weight * bckd["loss_bckd_box"]
    weighted["loss"] = sum(weighted.values())
    return weighted


def distillation_losses(cls_rows: torch.Tensor, box_rows: torch.Tensor, teacher_box: torch.Tensor,
                        teacher_cls: torch.Tensor | None, assign: BatchAssignment, gfl: GFLLossOutput,
                        cfg: LossConfig, reg_max: int, num_classes: int | None = None,
                        holes: bool = True) -> dict[str, torch.Tensor]:
    """Unweighted Main LD, VLR LD and Main KD (a term whose weight is 0 is not computed), each
    normalised as cfg says (distill.config: image / official / positive / mean; coco / official)."""
    bins = reg_max + 1
    # keeps every term a graph node, even when empty; summed in float32: an fp16 (AMP) sum of every
    # box logit overflows to inf, and inf * 0 is NaN
    zero = box_rows.sum(dtype=torch.float32) * 0
    pos = assign.pos
    out = {"loss_ld": zero, "loss_ld_vlr": zero, "loss_kd": zero}
    num_classes = num_classes or cls_rows.shape[1]

    region = vlr_region(assign, cfg.vlr_gamma, cfg.vlr_iou) if cfg.vlr_weight > 0 else None
    # Every rank computes the normalisers (some average over ranks), positives or not.
    main_norm = _ld_norm(cfg, assign, gfl, float(pos.numel()), REF_POSITIVES_PER_IMAGE)
    vlr_norm = _ld_norm(cfg, assign, gfl, region.weights.sum() if region else 0.0, REF_VLR_WEIGHT_PER_IMAGE)

    # Main LD and VLR LD are the same KL on box rows: one call for the rows of both regions.
    main_rows = pos if cfg.ld_weight > 0 else pos[:0]
    vlr_rows = region.rows if region is not None else pos[:0]
    if main_rows.numel() or vlr_rows.numel():
        rows = torch.cat([main_rows, vlr_rows])
        kl = distill_kl(box_rows[rows].reshape(-1, bins), _needed(teacher_box[rows], "LD", holes).reshape(-1, bins),
                        cfg.effective_ld_temperature).reshape(-1, 4).sum(dim=1)  # [rows]: summed over the 4 edges
        main_kl, vlr_kl = kl[:main_rows.numel()], kl[main_rows.numel():]
        if main_rows.numel():  # the official sums (/ 4 and / 16), normalised
            out["loss_ld"] = (main_kl * gfl.pos_weights).sum() / 4 / main_norm
        if vlr_rows.numel():
            out["loss_ld_vlr"] = (vlr_kl * region.weights).sum() / 16 / vlr_norm

    if cfg.kd_weight > 0 and cfg.kd_mode_for(num_classes) != "off":
        if teacher_cls is None:
            raise UserError("Main KD needs the teacher's class logits, which this cache does not hold (dumped "
                            "with --no-cls); pass --kd-weight 0 or dump the teacher with class logits")
        kd = sigmoid_kl if cfg.kd_mode_for(num_classes) == "sigmoid" else distill_kl
        rows = kd(cls_rows[pos], _needed(teacher_cls[pos], "Main KD", holes), cfg.kd_temperature)  # [P]: class mean
        if cfg.kd_normalization == "coco":  # the sum over classes / 80: the official at 80 classes, any C alike
            rows = rows * (num_classes / REF_NUM_CLASSES)
        # Official normalisation: per FPN level, the mean over that level's positives, summed. Under
        # torchrun the counts are averaged over ranks (every rank takes part, positives or not), so
        # the mean over ranks of this loss, which DDP optimises, is the single-process value.
        levels = assign.levels[pos]
        sums = torch.zeros(assign.num_levels, device=box_rows.device).index_add(0, levels, rows)
        counts = reduce_mean(torch.bincount(levels, minlength=assign.num_levels).float())
        out["loss_kd"] = (sums[counts > 0] / counts[counts > 0]).sum() + zero
    return out


def bckd_losses(cls_rows: torch.Tensor, box_rows: torch.Tensor, teacher_rows, assign: BatchAssignment,
                gfl: GFLLossOutput, cfg: LossConfig, reg_max: int, holes: bool = True) -> dict[str, torch.Tensor]:
    """Unweighted BCKD terms at every location of the batch (positives and negatives), each summed
    and divided by QFL's positive count (averaged over ranks): batch-size invariant as written.
    The student's box keeps its gradient; the teacher's box, probabilities and the box weights do
    not. Teacher boxes are its expected edges (TeacherRows.edges where the source stores them, else
    the integral of its box logits), decoded around each anchor centre in stride units."""
    teacher_cls = teacher_rows[1]
    if teacher_cls is None:
        raise UserError("BCKD needs the teacher's class logits at every location, which this cache does not hold "
                        "(dumped with --no-cls); dump the teacher with class logits")
    edges = getattr(teacher_rows, "edges", None)
    if edges is None:
        edges = integral(_needed(teacher_rows[0], "BCKD", holes).float(), reg_max)  # [N, 4]
    teacher_cls = _needed(teacher_cls, "BCKD", holes)
    zero = box_rows.sum(dtype=torch.float32) * 0  # not NaN under fp16 AMP (distillation_losses)
    out = {"loss_bckd_cls": zero, "loss_bckd_box": zero}
    if cfg.bckd_cls_weight > 0:
        out["loss_bckd_cls"] = bckd_cls_loss(cls_rows, teacher_cls).sum() / gfl.num_pos
    if cfg.bckd_box_weight > 0:
        centres = anchor_centres(assign.anchors) / assign.strides[:, None]  # [N, 2] stride units
        student_boxes = distance_to_box(centres, integral(box_rows.float(), reg_max))  # [N, 4]
        teacher_boxes = distance_to_box(centres, edges.detach().float())
        weights = bckd_box_weights(cls_rows, teacher_cls)  # [N]
        out["loss_bckd_box"] = (weights * (1 - aligned_giou(student_boxes, teacher_boxes))).sum() / gfl.num_pos
    return out


def _ld_norm(cfg: LossConfig, assign: BatchAssignment, gfl: GFLLossOutput, amount, ref_per_image: float):
    """What an official LD sum is divided by. image: the images of this process / 2, so the
    official at the paper's 2 images per GPU; positive: `amount` (positives, or VLR weight) averaged
    over ranks / its COCO-like amount for 2 images; mean: the GIoU weight sum; official: 1."""
    if cfg.ld_normalization == "image":
        return len(assign.rows_per_image) / REF_IMAGES_PER_PROCESS
    if cfg.ld_normalization == "positive":
        amount = reduce_mean(torch.as_tensor(amount, dtype=torch.float32, device=assign.anchors.device))
        return amount.clamp(min=1e-6) / (ref_per_image * REF_IMAGES_PER_PROCESS)
    if cfg.ld_normalization == "mean":
        return gfl.weight_sum
    return 1.0


def _needed(teacher_rows: torch.Tensor, term: str, holes: bool) -> torch.Tensor:
    """Teacher rows a loss reads must exist: a region-sparse cache marks the rows it lacks with NaN
    (holes=True; checked only then, the check waits for the device)."""
    if holes and torch.isnan(teacher_rows).any():
        hint = ("a dense or an ld+bckd cache (dump-teacher --store-regions dense or ld+bckd)" if term == "BCKD" else
                "the VLR settings it was dumped for (inspect-cache shows them) or a dense cache")
        raise UserError(f"{term} needs teacher rows that this region-sparse cache does not store; use {hint}")
    return teacher_rows
