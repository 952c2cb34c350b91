"""What data a run uses, as one config: DataConfig, declared once for every command (train-detector,
train-student, dump-teacher, evaluate, inspect-cache each expose the fields they use), and resolved
once (DataConfig.resolve) by the run that reads it, with the rules for what the user left out:

- no --images/--ann: the embedded synthetic dataset (its train or val split; a training run on it
  also evaluates on its val split), at its own 256 px scale; a student on a cache: the dataset the
  dump read, if it is still there;
- no --img-scale: the scale a hint gives (the checkpoint's training scale, the cache's), else the
  synthetic data's own, else mmdetection's 1333,800;
- no --views / --extra-scales: a cache's views and other scales (extra scales only while the scale
  is the cache's too), else orig,hflip and none;
- half a pair (images without ann, val images without val annotations) is an error, never
  completed from the synthetic data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from core.config import check, param, validate_fields
from core.domains import MAX_SEED, Range
from core.errors import UserError
from core.paths import InputDir, InputFile
from data.synthetic import SYNTHETIC_IMG_SCALE, synthetic_default_path, synthetic_split
from data.views import DEFAULT_IMG_SCALE, Scale, Scales, Views

DEFAULT_VIEWS = "orig,hflip"


@dataclass(frozen=True)
class DataConfig:
    images: str | None = param(None, "image folder (with --ann)", InputDir("image folder"),
                               shown="the synthetic dataset's; a cache's own")
    ann: str | None = param(None, "COCO annotation json of the images (with --images)", InputFile("annotation file"),
                            shown="the synthetic dataset's; a cache's own")
    val_images: str | None = param(None, "validation images, evaluated after training (with --val-ann)",
                                   InputDir("image folder"), shown="synthetic val on the synthetic data")
    val_ann: str | None = param(None, "validation annotations (with --val-images)", InputFile("annotation file"),
                                shown="synthetic val on the synthetic data")
    img_scale: tuple[int, int] | None = param(None, "keep-ratio resize target LONG,SHORT", Scale(),
                                              shown="a checkpoint's or cache's own, else 1333,800; 256,256 on the "
                                                    "synthetic data")
    views: str | None = param(None, "views of an image: orig, hflip or both (training: one drawn per image each "
                                    "epoch)", Views(), shown="orig,hflip; a cache's own")
    extra_scales: tuple[tuple[int, int], ...] | None = param(None, "more scales 'L1,S1;L2,S2', each with the views",
                                                             Scales(), shown="none; a cache's own unless --img-scale "
                                                                             "is given")
    subset_fraction: float = param(1.0, "train on this seeded random fraction of the training images (a subset "
                                        "of one cache reads the cache's rows)",
                                   Range(0, 1, integer=False, low_open=True))
    subset_seed: int = param(0, "seed of --subset-fraction's draw", Range(0, MAX_SEED))

    def __post_init__(self):
        for name in ("images", "ann", "val_images", "val_ann"):  # paths as given (Path objects from code)
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and hasattr(value, "__fspath__"):
                object.__setattr__(self, name, str(value))
        validate_fields(self, "data configuration")
        problems = []
        if (self.images is None) != (self.ann is None):
            problems.append(pair_problem("--images", "--ann", self.images is not None, "the synthetic dataset"))
        if (self.val_images is None) != (self.val_ann is None):
            problems.append(pair_problem("--val-images", "--val-ann", self.val_images is not None,
                                         "the synthetic val split on the default data"))
        scales = [tuple(s) for s in (*([self.img_scale] if self.img_scale else []), *(self.extra_scales or ()))]
        if len(set(scales)) < len(scales):  # each view would be stored and trained on twice
            problems.append(f"--extra-scales {';'.join(f'{a},{b}' for a, b in self.extra_scales)} repeats a scale "
                            "(or --img-scale's): give each scale once")
        check(problems, "data configuration")

    @property
    def resolved(self) -> bool:
        return None not in (self.images, self.ann, self.img_scale, self.views, self.extra_scales)

    def resolve(self, split: str = "train", *, val: bool = False, scale: tuple[int, int] | None = None,
                views: str | None = None, extra_scales: tuple | None = None,
                dataset: tuple[str, str] | None = None, fallback: bool = True) -> DataConfig:
        """Every field set, by the rules of the module docstring. split: the synthetic split a run
        without data reads (train, or val for evaluate); val: a training run, which evaluates on the
        synthetic val split when it trains on the synthetic data; scale, views, extra_scales: a
        checkpoint's or a cache's (hints); dataset: (images, ann) a cache was dumped from, used if
        still there; fallback=False: no synthetic data when neither is there (an error)."""
        images, ann, val_images, val_ann = self.images, self.ann, self.val_images, self.val_ann
        synthetic = False
        if images is None and dataset is not None and Path(dataset[0]).is_dir() and Path(dataset[1]).is_file():
            images, ann = (str(p) for p in dataset)
            synthetic = _is_synthetic_train(ann)
        elif images is None and not fallback:
            where = f" ({dataset[0]}, {dataset[1]})" if dataset else ""
            raise UserError(f"this needs the dataset the cache was dumped from, which is no longer where the dump "
                            f"found it{where}: pass --images and --ann where it is now")
        elif images is None:
            images, ann = (str(p) for p in synthetic_split(split))
            synthetic = True
        if synthetic and val and val_images is None:
            val_images, val_ann = (str(p) for p in synthetic_split("val"))
        img_scale = self.img_scale or scale or (SYNTHETIC_IMG_SCALE if synthetic else DEFAULT_IMG_SCALE)
        extra = self.extra_scales
        if extra is None:
            extra = tuple(extra_scales or ()) if self.img_scale is None else ()
        return dataclasses.replace(self, images=images, ann=ann, val_images=val_images, val_ann=val_ann,
                                   img_scale=tuple(img_scale), views=self.views or views or DEFAULT_VIEWS,
                                   extra_scales=extra)


def pair_problem(first: str, second: str, first_given: bool, fallback: str) -> str:
    given, missing = (first, second) if first_given else (second, first)
    return f"{given} was given without {missing}: give both, or neither ({fallback})"


def _is_synthetic_train(ann: str) -> bool:
    """Is this the embedded synthetic dataset's train split (a dump of it: evaluate on its val)?"""
    return Path(ann).resolve() == (synthetic_default_path() / "annotations" / "instances_train.json").resolve()
