"""A student run wired to its teacher: a cache (stage 1's product) or a teacher run online, and the
data defaults a cache implies (its views, its dataset), so `train-student --cache C` needs nothing else."""

from __future__ import annotations

from pathlib import Path

from cache_teacher.reader import TeacherCache
from cache_teacher.targets import CacheTeacher
from detector.errors import UserError
from detector.runtime import resolve_device
from detector.synthetic import synthetic_split
from distill.teachers import OnlineTeacher, TeacherSource


def teacher_source(cache: str | None, teacher: str | None, storage_options: dict | None = None,
                   teacher_arch: dict | None = None, device: str = "auto", amp: str = "auto") -> TeacherSource:
    if (cache is None) == (teacher is None):
        raise UserError("give exactly one of --cache (a dump-teacher store) or --teacher (run the teacher online)")
    if cache is not None:
        return CacheTeacher(TeacherCache(cache, storage_options))
    return OnlineTeacher.from_checkpoint(teacher, teacher_arch or {}, resolve_device(device), amp=amp)


def data_defaults(source: TeacherSource, data_fields: dict) -> dict:
    """The data fields of a student run from a cache, where the user gave none: the cached views
    (never a view the teacher did not see), and the dataset the dump read if it is still there
    (the synthetic default then also evaluates on its val split)."""
    if not isinstance(source, CacheTeacher):
        return {}
    cache, out = source.cache, {}
    if not {"views", "img_scale", "extra_scales"} & set(data_fields):
        scales = list(dict.fromkeys(s.img_scale for s in cache.specs))
        kinds = list(dict.fromkeys("hflip" if s.flip else "orig" for s in cache.specs))
        out.update(views=",".join(kinds), img_scale=scales[0], extra_scales=tuple(scales[1:]))
    hint = cache.meta.source
    if not {"images", "ann"} & set(data_fields) and hint.get("ann") and Path(hint["ann"]).is_file() \
            and Path(hint.get("images", "")).is_dir():
        out.update(images=hint["images"], ann=hint["ann"])
        if "synthetic-v" in hint["ann"] and "val_ann" not in data_fields:
            train_ann = synthetic_split("train")[1]
            if Path(hint["ann"]).resolve() == train_ann.resolve():
                out["val_images"], out["val_ann"] = (str(p) for p in synthetic_split("val"))
    return out
