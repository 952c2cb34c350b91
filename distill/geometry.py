"""How a dataset's boxes sit in the detector's box-distribution bins, which decides how much the
LD temperature can soften a teacher's distribution and still say something.

A GFL edge distribution has reg_max + 1 bins, one stride apart, and the DFL target of an edge is
the distance from the anchor centre to the GT edge in strides. At the ATSS positives of COCO at
1333x800 those distances spread over bins 0-10 (median 3.5 bins); on data whose objects are
smaller than the detector's finest anchors they pile up in the first bins (median under one bin),
the other bins are never a target, and the teacher's logits there are whatever its training left.
At the paper's T = 10 the LD KL is close to matching every logit alike, those included; at T = 1 it
follows the teacher's mass near the edges. Which transfers more on such data is measured, not
derived (docs/defaults.md: "The LD temperature on small objects")."""

from __future__ import annotations

import torch

from data.coco import CocoDetection
from detector.atss import assign_view
from detector.box_ops import box_to_distance
from detector.gfl_loss import DFL_EPS, pos_geometry

SAMPLE_IMAGES = 200  # images read (evenly spread over the dataset): seconds even at COCO's size


def positive_edge_distances(dataset: CocoDetection, strides: tuple[int, ...], reg_max: int,
                            max_images: int = SAMPLE_IMAGES) -> torch.Tensor:
    """[E] distances in bins (strides) from the ATSS positives' anchor centres to their GT edges, as
    DFL targets them (clamped to [0, reg_max - 0.1]), on the first view of up to max_images images."""
    n = len(dataset)
    picks = sorted({int(i) for i in torch.linspace(0, n - 1, min(n, max_images)).round().tolist()}) if n else []
    distances = []
    for index in picks:
        _, boxes, assign = assign_view(dataset, index, 0, strides)
        if len(boxes) == 0:
            continue
        centres, targets = pos_geometry(assign)  # stride units
        distances.append(box_to_distance(centres, targets, reg_max, DFL_EPS).reshape(-1))
    return torch.cat(distances) if distances else torch.zeros(0)


def median_edge_bins(dataset: CocoDetection, strides: tuple[int, ...], reg_max: int,
                     max_images: int = SAMPLE_IMAGES) -> float | None:
    """The median of positive_edge_distances, or None for a dataset without boxes."""
    distances = positive_edge_distances(dataset, strides, reg_max, max_images)
    return float(distances.median()) if distances.numel() else None


def temperature_note(temperature: float, median_bins: float) -> str:
    """What a run prints when the LD temperature was chosen from the data (LossConfig.for_edges)."""
    return (f"LD temperature {temperature:g}: this data's box edges lie {median_bins:.2f} bins from their positives "
            "(median; COCO: 3.5); on such data T=1 beat plain training on every seed measured, the paper's "
            "T=10 not always; --ld-temperature sets it")
