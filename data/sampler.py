"""Which (image, view) pairs make up each batch: a pure function of (seed, epoch).

Every epoch shuffles the images and draws one view per image with a generator seeded by the seed
and the epoch only, so batches are the same whatever the number of loader workers, and a run
resumed in the middle of an epoch replays exactly the batches it had not yet seen. Batches hold
images of one group where possible: one orientation (landscape or portrait), as mmdetection groups
them, so padding stays small; or one padded canvas, so no image is padded at all and a student sees
each view exactly as the cached teacher saw it (GroupNorm statistics include the padding). Under
torchrun, global batches of world_size x batch_size are formed first and rank r takes the r-th slice
of each, so N processes see what one process with the global batch sees.
"""

from __future__ import annotations

import torch

from data.coco import CocoDetection

Key = tuple[int, int]  # (image index, view index)


class ViewBatchSampler:
    """groups[i][v]: the batching group of view v of image i (its orientation, or its padded
    canvas). A full batch holds one group; leftovers of all groups fill the last batches."""

    def __init__(self, groups: list[list], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.groups = [list(g) for g in groups]
        self.num_views = len(self.groups[0]) if self.groups else 1
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate, skipping its first start_batch batches (resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batches(self, epoch: int) -> list[list[Key]]:
        n = len(self.groups)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        views = torch.randint(self.num_views, (n,), generator=gen).tolist()
        size = self.batch_size * self.world_size
        batches, buckets = [], {}
        for i in order:
            bucket = buckets.setdefault(self.groups[i][views[i]], [])
            bucket.append((i, views[i]))
            if len(bucket) == size:
                batches.append(bucket.copy())
                bucket.clear()
        # Leftovers of every group fill the last batches, groups in descending order (landscape first).
        leftover = [key for group in sorted(buckets, reverse=True) for key in buckets[group]]
        for start in range(0, len(leftover), size):
            batches.append(leftover[start:start + size])
        if self.world_size > 1 and batches and len(batches[-1]) < size:
            # Every rank needs a full share: top the last global batch up from the epoch's start.
            flat = [k for b in batches for k in b]
            batches[-1] = batches[-1] + flat[: size - len(batches[-1])]
        return batches

    def __iter__(self):
        for batch in self.global_batches(self.epoch)[self.start_batch:]:
            yield batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return len(self.global_batches(self.epoch)) - self.start_batch

    def batches_per_epoch(self) -> int:
        n, size = len(self.groups), self.batch_size * self.world_size
        return -(-n // size) if n else 0


def batch_groups(dataset: CocoDetection, group_by: str) -> list[list]:
    """The sampler's group of every (image, view): orientation or padded canvas."""
    if group_by == "canvas":
        return [[dataset.view_record(i, v).padded_hw for v in range(len(dataset.views))] for i in range(len(dataset))]
    return [[dataset.orig_hw(i)[1] >= dataset.orig_hw(i)[0]] * len(dataset.views) for i in range(len(dataset))]
