"""Encoding of teacher logit rows for storage, and back.

fp16 is the reference mode. uint8 stores each edge's 17 box logits as q in 0..255 with a per row
and edge affine (lo, scale) kept in fp16: logit = lo + q * scale. lo and scale are rounded to fp16
BEFORE quantising, with lo rounded down and scale up, so the stored parameters reproduce the range
exactly and the error of every logit is at most scale / 2 (no tail clipping, which the cache spec
measured as harmful at T = 10)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from detector.distributions import integral

UINT8_LEVELS = 255


def encode_rows(rows: torch.Tensor, dtype: str, reg_max: int | None = None) -> dict[str, torch.Tensor]:
    """rows [n, K] float (any device) -> {"data": [n, K] in dtype} (+ {"lo", "scale"}: [n, 4] fp16
    for uint8), on the same device: a dump encodes on the GPU and copies only the stored bytes."""
    rows = rows.float()
    if dtype == "float32":
        return {"data": rows}
    if dtype == "float16":
        return {"data": rows.half()}
    if dtype != "uint8":
        raise ValueError(f"unknown storage dtype {dtype!r}")
    n, k = rows.shape
    bins = k // 4 if reg_max is None else reg_max + 1
    edges = rows.reshape(n, 4, bins)  # [n, 4, n+1]
    lo = _fp16_down(edges.amin(-1))  # [n, 4]
    span = edges.amax(-1) - lo.float()
    scale = _fp16_up(span / UINT8_LEVELS).float().clamp(min=float(np.finfo(np.float16).tiny))
    q = ((edges - lo.float()[..., None]) / scale[..., None]).round().clamp(0, UINT8_LEVELS)
    return {"data": q.to(torch.uint8).reshape(n, k), "lo": lo, "scale": scale.half()}


def all_finite(encoded: dict[str, np.ndarray]) -> np.ndarray:
    """Per row: did the logits encode to finite values? (a NaN or inf poisons lo/scale for uint8)"""
    checks = [np.isfinite(a.reshape(len(a), -1)).all(axis=1) for a in encoded.values() if a.dtype.kind == "f"]
    return np.logical_and.reduce(checks) if checks else np.ones(len(next(iter(encoded.values()))), dtype=bool)


def decode_rows(data, lo=None, scale=None, device=None) -> torch.Tensor:
    """Stored rows (numpy or torch) -> float32 logits [n, K], on `device` if given. Only the stored
    bytes are moved; the decode runs where the logits are needed."""
    data = torch.as_tensor(data).to(device, non_blocking=True)
    if data.dtype != torch.uint8:
        return data.float()
    n, k = data.shape
    lo = torch.as_tensor(lo).to(device, non_blocking=True).float()[..., None]  # [n, 4, 1]
    scale = torch.as_tensor(scale).to(device, non_blocking=True).float()[..., None]
    return (lo + data.float().reshape(n, 4, k // 4) * scale).reshape(n, k)


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value <= x (elementwise)."""
    h = x.half()
    too_big = h.float() > x
    return torch.where(too_big, torch.nextafter(h, torch.full_like(h, -float("inf"))), h)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= x (elementwise)."""
    h = x.half()
    too_small = h.float() < x
    return torch.where(too_small, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def encode_topk(cls_rows: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Class logits [n, C] -> {"topk": [n, k] fp16 (the k largest), "index": [n, k] their classes
    (uint8, or int16 above 256 classes), "floor": [n] fp16}: every other class is given the logit
    of the mean probability of those classes, so the mass BCKD's targets put on them is kept."""
    cls_rows = cls_rows.float()
    n, num_classes = cls_rows.shape
    k = min(k, num_classes)
    values, index = cls_rows.topk(k, dim=1)  # [n, k]
    rest = num_classes - k
    if rest:
        # The logit of the mean probability of the rest, log(sum p) - log(sum (1 - p)) over the left-out
        # classes, in log space: exact at any logit (a probability clamped away from 0 and 1 would put
        # the floor above the top k where every logit is far below 0, or below them far above 0).
        kept = torch.zeros_like(cls_rows, dtype=torch.bool).scatter_(1, index, True)
        log_p = F.logsigmoid(cls_rows).masked_fill(kept, -float("inf"))
        log_not_p = F.logsigmoid(-cls_rows).masked_fill(kept, -float("inf"))
        floor = torch.logsumexp(log_p, dim=1) - torch.logsumexp(log_not_p, dim=1)
    else:
        floor = torch.zeros(n, device=cls_rows.device)
    index_dtype = torch.uint8 if num_classes <= 256 else torch.int16
    return {"topk": values.half(), "index": index.to(index_dtype), "floor": floor.half()}


def decode_topk(topk, index, floor, num_classes: int, device=None) -> torch.Tensor:
    """The stored top-k rows back to class logits [n, C] float32 (the floor everywhere else)."""
    topk = torch.as_tensor(topk).to(device, non_blocking=True).float()
    index = torch.as_tensor(index).to(device, non_blocking=True).long()
    floor = torch.as_tensor(floor).to(device, non_blocking=True).float()
    out = floor[:, None].expand(-1, num_classes).clone()
    return out.scatter_(1, index, topk)


def encode_edges(box_rows: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Box logits [n, 4(n+1)] -> the expected distance of each edge [n, 4] fp16, in stride units
    (softmax over the bins . bin positions: the distances the boxes are decoded from)."""
    return integral(box_rows.float(), reg_max).half()
