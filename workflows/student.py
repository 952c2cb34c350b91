"""A student run wired to its teacher: a cache (stage 1's product) or a teacher run online, and the
data a cache implies (its views and scales, its dataset: data_hints), so `train-student --cache C`
needs nothing else."""

from __future__ import annotations

from pathlib import Path

import torch

from cache_teacher.reader import CacheReader
from cache_teacher.targets import CachedTeacher
from core.errors import UserError
from data.synthetic import synthetic_default_path
from distill.teachers import OnlineTeacher, TeacherSource


def teacher_source(cache: str | None, teacher: str | None, storage_options: dict | None = None,
                   teacher_arch: dict | None = None, amp: str = "auto") -> TeacherSource:
    """The run's teacher. An online teacher is loaded on the CPU: the training moves it to the
    process's own device (under torchrun, cuda:LOCAL_RANK) once that is known (TeacherSource.to)."""
    if (cache is None) == (teacher is None):
        raise UserError("give exactly one of --cache (a dump-teacher store) or --teacher (run the teacher online)")
    if cache is not None:
        return CachedTeacher(CacheReader(cache, storage_options))
    return OnlineTeacher.from_checkpoint(teacher, teacher_arch or {}, torch.device("cpu"), amp=amp)


def data_hints(source: TeacherSource | None) -> dict:
    """What a student run's data defaults to from its teacher source (DataConfig.resolve's hints):
    a cache's views, scale and other scales (so never a view the teacher did not see unless asked
    for) and the dataset the dump read, if it is still there. An online teacher or none: nothing."""
    if not isinstance(source, CachedTeacher):
        return {}
    cache = source.cache
    scales = list(dict.fromkeys(s.img_scale for s in cache.specs))
    hints = {"scale": scales[0], "extra_scales": tuple(scales[1:]),
             "views": ",".join(dict.fromkeys("hflip" if s.flip else "orig" for s in cache.specs))}
    source_hint = cache.meta.source
    if source_hint.get("images") and source_hint.get("ann"):
        hints["dataset"] = (source_hint["images"], source_hint["ann"])
        # a dataset that moved is an error naming --images/--ann, never the synthetic data in its place
        # (generated, then refused by the cache), unless the dump read the synthetic data (regenerated the same)
        hints["fallback"] = Path(source_hint["ann"]).resolve().parent.parent == synthetic_default_path().resolve()
    return hints
