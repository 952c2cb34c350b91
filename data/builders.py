"""The datasets a run trains and evaluates on, from its resolved DataConfig (data/config.py)."""

from __future__ import annotations

import torch

from data.coco import CocoDetection
from data.config import DataConfig
from data.views import ViewSpec, parse_views


def build_train_dataset(data: DataConfig, strides) -> CocoDetection:
    """The training images, all or a seeded random subset_fraction of them (in dataset order)."""
    data = data.resolve()  # fields left out by a caller in code: the defaults (idempotent when resolved)
    views = parse_views(data.views, data.img_scale, data.extra_scales)
    dataset = CocoDetection(data.images, data.ann, views=views, strides=strides, train=True)
    if data.subset_fraction < 1:
        keep = max(1, round(data.subset_fraction * len(dataset)))
        gen = torch.Generator().manual_seed(data.subset_seed)
        dataset = dataset.subset(sorted(torch.randperm(len(dataset), generator=gen)[:keep].tolist()))
    return dataset


def build_val_dataset(data: DataConfig, strides) -> CocoDetection | None:
    data = data.resolve()
    if data.val_ann is None:
        return None
    return CocoDetection(data.val_images, data.val_ann, views=[ViewSpec(False, data.img_scale)], strides=strides,
                         train=False)
