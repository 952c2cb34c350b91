"""Whether two runtimes' detections of one model agree, up to float rounding (`ldcache export`'s
check of the file it wrote).

Runtimes compute the same boxes and scores to ~1e-5, but NMS and the thresholds turn a rounding
difference into a different list when a decision sits on its boundary: two boxes of one class
whose IoU is the NMS threshold to the last bits (an untrained head's boxes lie on its grid, where
IoUs such as 128*144 / (192*160) = 0.6 are exact), a score at the score threshold, or the K-th
detection of a full list. So detections are matched one to one (same label, box and score within
the tolerance); one left unmatched is a rounding difference only when a boundary decision explains
it, directly or through a chain of unmatched boxes of its class that overlap beyond the NMS
threshold (a box one runtime suppressed no longer suppresses the boxes it overlaps). Anything else,
a shifted box, another label, a lost detection, is a disagreement."""

from __future__ import annotations

import torch

from detector.box_ops import pairwise_iou

IOU_ROUNDING = 1e-4  # an IoU this close to the NMS threshold is decided by rounding


def match(got: tuple, expected: tuple, tol: float) -> tuple[list[tuple[int, int]], float]:
    """One image's (boxes [K, 4], scores [K], labels [K]) pair -> matched (got, expected) slots of
    the valid detections (label >= 0), best expected first, and the largest box or score difference
    over the matched pairs."""
    pairs, worst = [], 0.0
    free = [bool(lab >= 0) for lab in got[2]]
    for e in (expected[1] * (expected[2] >= 0)).argsort(descending=True, stable=True).tolist():
        if expected[2][e] < 0:
            break
        diff = torch.maximum((got[0] - expected[0][e]).abs().amax(-1), (got[1] - expected[1][e]).abs())
        ok = [g for g in range(len(free)) if free[g] and got[2][g] == expected[2][e] and diff[g] <= tol]
        if ok:
            g = min(ok, key=lambda k: float(diff[k]))
            free[g] = False
            pairs.append((g, e))
            worst = max(worst, float(diff[g]))
    return pairs, worst


def unexplained(got: tuple, expected: tuple, pairs: list[tuple[int, int]], iou_thr: float, score_thr: float,
                tol: float) -> list[int]:
    """Indices, into the unmatched detections of both lists (got's first), of those no boundary
    decision explains."""
    def valid(dets):
        return (dets[2] >= 0).nonzero()[:, 0].tolist()

    matched = ({g for g, _ in pairs}, {e for _, e in pairs})
    loose = [(side, i) for side, dets in enumerate((got, expected)) for i in valid(dets) if i not in matched[side]]
    if not loose:
        return []
    sides = (got, expected)
    every = [(side, i) for side in (0, 1) for i in valid(sides[side])]
    boxes = torch.stack([sides[s][0][i] for s, i in every])
    labels = torch.stack([sides[s][2][i] for s, i in every])
    at = {key: n for n, key in enumerate(every)}
    iou = pairwise_iou(boxes, boxes)
    same = labels[:, None] == labels[None, :]
    full_tail = max((float(d[1][valid(d)].min()) for d in sides if len(valid(d)) == d[2].shape[0]), default=-1.0)

    def root(side, i):
        score, n = float(sides[side][1][i]), at[(side, i)]
        on_nms_edge = same[n] & ((iou[n] - iou_thr).abs() <= IOU_ROUNDING)
        return abs(score - score_thr) <= tol or score <= full_tail + tol or bool(on_nms_edge.any())

    reached = {key for key in loose if root(*key)}
    grew = True
    while grew:  # spread through unmatched boxes of a class overlapping beyond the threshold
        grew = False
        for key in loose:
            if key not in reached and any(same[at[key], at[r]] and iou[at[key], at[r]] >= iou_thr - IOU_ROUNDING
                                          for r in reached):
                reached.add(key)
                grew = True
    return [n for n, key in enumerate(loose) if key not in reached]


def compare(got: tuple, expected: tuple, iou_thr: float, score_thr: float, tol: float) -> tuple[float, list[str]]:
    """Batched detections (boxes [N, K, 4], scores [N, K], labels [N, K]; unused slots label -1)
    of two runtimes -> (largest difference of matched pairs, one line per image whose lists
    differ beyond rounding)."""
    worst, problems = 0.0, []
    for n in range(expected[0].shape[0]):
        mine, theirs = tuple(t[n] for t in got[:3]), tuple(t[n] for t in expected[:3])
        pairs, diff = match(mine, theirs, tol)
        worst = max(worst, diff)
        bad = unexplained(mine, theirs, pairs, iou_thr, score_thr, tol)
        if bad:
            problems.append(f"image {n}: {len(bad)} of its detections have no counterpart within {tol:g} and no "
                            "threshold decision explains them")
    return worst, problems
