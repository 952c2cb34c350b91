"""Timed random reads of a cache's views (read_throughput, scaleout): a Dataset of views, a seeded
random order, and the measurement with or without DataLoader workers."""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from cache_teacher.reader import CacheReader

MB = 2**20


class ViewReads(torch.utils.data.Dataset):
    """Index v -> the decoded float32 logits of view v (the reader opens its arrays per process)."""

    def __init__(self, cache: CacheReader, kinds: tuple[str, ...]):
        self.cache, self.kinds = cache, kinds

    def __len__(self) -> int:
        return len(self.cache.records)

    def __getitem__(self, v: int) -> dict[str, torch.Tensor]:
        view = self.cache.read_view(int(v), self.kinds)
        out = {"box": view.box}
        if view.cls is not None:
            out["cls"] = view.cls
        return out


class RandomViews(torch.utils.data.Sampler):
    """Seeded random permutations of all views, one after another, forever (or num_reads)."""

    def __init__(self, num_views: int, seed: int, num_reads: int = 0):
        self.num_views, self.seed, self.num_reads = num_views, seed, num_reads

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        stream = itertools.chain.from_iterable(rng.permutation(self.num_views).tolist() for _ in itertools.count())
        return itertools.islice(stream, self.num_reads) if self.num_reads else stream


def stored_bytes_per_view(cache: CacheReader, kinds) -> np.ndarray:
    """[V] encoded bytes of the arrays a read of these kinds touches."""
    return cache.stored_bytes(kinds)


def measure(dataset: ViewReads, workers: int, sampler: RandomViews, seconds: float, nbytes: np.ndarray) -> dict:
    """Read views in the sampler's order until the time or the reads run out."""
    if workers == 0:
        order, startup = iter(sampler), 0.0
        start, count, read = time.perf_counter(), 0, 0
        for v in order:
            dataset[v]
            count += 1
            read += int(nbytes[v])
            if not sampler.num_reads and time.perf_counter() - start >= seconds:
                break
        elapsed = time.perf_counter() - start
    else:
        # The sampler runs in the main process; keep the index beside each item to count its bytes.
        indices = []
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=_Recorded(sampler, indices),
                                             num_workers=workers)
        launch = time.perf_counter()
        it = iter(loader)
        next(it)  # worker start-up and the first view: not part of the steady rate
        start = time.perf_counter()
        startup = start - launch
        count, read = 0, 0
        for _ in it:
            read += int(nbytes[indices[count + 1]])
            count += 1
            if not sampler.num_reads and time.perf_counter() - start >= seconds:
                break
        elapsed = time.perf_counter() - start
        del it  # shuts the workers down
    return {"reads": count, "seconds": elapsed, "views_per_s": count / elapsed, "mb_per_s": read / elapsed / MB,
            "startup_seconds": startup}


class _Recorded(torch.utils.data.Sampler):
    """Passes a sampler's indices through, appending each to a list (in the order they are handed
    to workers, which is the order the in-order DataLoader returns them)."""

    def __init__(self, sampler, out: list):
        self.sampler, self.out = sampler, out

    def __iter__(self):
        for v in self.sampler:
            self.out.append(v)
            yield v
