"""A student run wired to its teacher: a cache (stage 1's product) or a teacher run online, and the
data defaults a cache implies (its views, its dataset), so `train-student --cache C` needs nothing else."""

from __future__ import annotations

from pathlib import Path

import torch

from cache_teacher.reader import TeacherCache
from cache_teacher.targets import CacheTeacher
from core.errors import UserError
from data.synthetic import synthetic_split
from distill.teachers import OnlineTeacher, TeacherSource


def teacher_source(cache: str | None, teacher: str | None, storage_options: dict | None = None,
                   teacher_arch: dict | None = None, amp: str = "auto") -> TeacherSource:
    """The run's teacher. An online teacher is loaded on the CPU: the training moves it to the
    process's own device (under torchrun, cuda:LOCAL_RANK) once that is known (TeacherSource.to)."""
    if (cache is None) == (teacher is None):
        raise UserError("give exactly one of --cache (a dump-teacher store) or --teacher (run the teacher online)")
    if cache is not None:
        return CacheTeacher(TeacherCache(cache, storage_options))
    return OnlineTeacher.from_checkpoint(teacher, teacher_arch or {}, torch.device("cpu"), amp=amp)


def data_defaults(source: TeacherSource, data_fields: dict) -> dict:
    """The data fields of a student run from a cache, where the user gave none: the cached views
    and scales, each on its own (--views hflip keeps the cache's scale; a typed --img-scale drops
    the cache's extra scales unless --extra-scales is typed too), so never a view the teacher did
    not see unless asked for; and the dataset the dump read if it is still there (the synthetic
    default then also evaluates on its val split, unless a val pair is given)."""
    if not isinstance(source, CacheTeacher):
        return {}
    cache, out = source.cache, {}
    scales = list(dict.fromkeys(s.img_scale for s in cache.specs))
    if "views" not in data_fields:
        out["views"] = ",".join(dict.fromkeys("hflip" if s.flip else "orig" for s in cache.specs))
    if "img_scale" not in data_fields:
        out["img_scale"] = scales[0]
        if "extra_scales" not in data_fields:
            out["extra_scales"] = tuple(scales[1:])
    hint = cache.meta.source
    if not {"images", "ann"} & set(data_fields) and hint.get("ann") and Path(hint["ann"]).is_file() \
            and Path(hint.get("images", "")).is_dir():
        out.update(images=hint["images"], ann=hint["ann"])
        if "synthetic-v" in hint["ann"] and not {"val_images", "val_ann"} & set(data_fields):
            train_ann = synthetic_split("train")[1]
            if Path(hint["ann"]).resolve() == train_ann.resolve():
                out["val_images"], out["val_ann"] = (str(p) for p in synthetic_split("val"))
    return out
