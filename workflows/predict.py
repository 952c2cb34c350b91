"""`ldcache predict`: detections on image files and folders from a checkpoint or an exported file
(`ldcache export`), as COCO-style JSON and, with --draw, pictures.

The input is built as evaluate builds it (data/views.py: keep-ratio resize to the scale, normalise,
pad to 32), images are batched only with others of the same canvas (GroupNorm normalises over the
canvas: a batch gives each image its lone result), and a checkpoint's outputs are decoded by
detector/postprocess.py. An image that cannot be read is skipped and named, never the end of a run.
Pixels are taken as stored (no EXIF rotation), as for training and evaluation."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from core.config import config_to_dict, param, validate_fields
from core.domains import Flag, OneOf, Range, Table, Text, quote
from core.errors import UserError, first_line
from core.paths import OutputPath
from core.runtime import AMP_MODES, Device, autocast_for, progress_bar, resolve_device
from data.coco import rgb_pixels
from data.views import DEFAULT_IMG_SCALE, Scale, ViewSpec, build_view_input, plan_view
from detector.checkpoint import load_state_dict_strict, read_checkpoint, resolve_model_config, trained_img_scale
from detector.evaluation import detections_to_coco
from detector.exported import (
    ExportedDetector,
    category_ids_or_default,
    class_names_or_ids,
    exported_meta,
    recorded_category_ids,
    recorded_class_names,
)
from detector.inference import canvas_batches
from detector.model import build_detector
from detector.postprocess import Detections, PostprocessConfig, postprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on a bad file
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128))


class ImageInput(Text):
    """An existing image file or folder of images (folders are searched recursively)."""

    def __init__(self):
        super().__init__("an existing image file or folder", metavar="INPUT")

    def check(self, value) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return f"must be {self.allowed}, got {quote(value)}"
        return None if Path(value).expanduser().exists() else f"must be {self.allowed}; {value} does not exist"


@dataclass(frozen=True)
class PredictConfig:
    out: str = param("predictions", "folder to write: detections.json, images.json, skipped.txt, config.json, "
                     "draw/", OutputPath("dir"))
    score_thr: float = param(0.05, "keep detections scoring above this (0.05: the COCO test recipe; an exported "
                             "file keeps nothing below its own)", Range(0, 1, integer=False, high_open=True))
    draw: bool = param(False, "also draw each image's boxes, class names and scores to OUT/draw/", Flag())
    draw_thr: float = param(0.3, "draw only detections scoring above this", Range(0, 1, integer=False))
    img_scale: tuple[int, int] | None = param(None, "keep-ratio resize target LONG,SHORT", Scale(),
                                              shown="the checkpoint's or the exported file's, else 1333,800")
    batch_size: int = param(8, "images per forward (equal canvases only, so results do not change)", Range(1, 4096))
    device: str = param("auto", "auto (cuda when available), cpu, cuda or cuda:N", Device())
    workers: int = param(2, "DataLoader worker processes reading the images", Range(0, 256))
    amp: str = param("auto", "auto (bf16 on CUDA), off, bf16 or fp16 (a checkpoint's forward only)",
                     OneOf(*AMP_MODES))
    arch: dict = param(help="architecture flags for checkpoints without a config", domain=Table(), factory=dict,
                       flag=False)

    def __post_init__(self):
        validate_fields(self, "predict configuration")


def find_images(inputs: list[str], skip: Path | None = None) -> list[Path]:
    """Image files and folders -> the image files, each folder's sorted and searched recursively,
    in the order given, each once. A folder search leaves out what is under skip (an earlier run's
    OUT/draw pictures, when OUT lies inside an input folder) unless that folder is itself in skip.
    A missing path, a file of another kind or an empty folder is a UserError."""
    found: dict[Path, Path] = {}
    skip = skip.expanduser().resolve() if skip is not None else None
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            own = skip is not None and not path.resolve().is_relative_to(skip)
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not (own and p.resolve().is_relative_to(skip)))
            if not files:
                raise UserError(f"folder {text} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images")
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{text} is not an image file ({', '.join(IMAGE_SUFFIXES)}); pass images or folders")
            files = [path]
        else:
            raise UserError(f"input {text} does not exist; pass image files or folders")
        found.update((f.resolve(), f) for f in files if f.resolve() not in found)
    return list(found.values())


class ImageFiles(torch.utils.data.Dataset):
    """index -> (index, the network input [3, Hp, Wp] or None, why it could not be read)."""

    def __init__(self, paths: list[Path], records: list):
        self.paths, self.records = paths, records

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            with Image.open(self.paths[index]) as image:
                rgb = torch.from_numpy(rgb_pixels(image)).permute(2, 0, 1).contiguous()  # [3, H, W]
            return index, build_view_input(rgb, self.records[index]), None
        except READ_ERRORS as err:
            return index, None, first_line(err)


def collate_images(items: list) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    """One batch of equal canvas -> (indices read, images [B, 3, Hp, Wp], {index: why unreadable})."""
    read = [(i, image) for i, image, _ in items if image is not None]
    images = torch.stack([image for _, image in read]) if read else None
    return [i for i, _ in read], images, {i: why for i, _, why in items if why is not None}


class CheckpointDetector:
    """A checkpoint with the project's decoding (postprocess), used as an ExportedDetector is."""

    def __init__(self, path: str, ckpt: dict, arch: dict, device: torch.device, amp: str):
        config = resolve_model_config(ckpt, **arch)
        self.model = build_detector(config)
        load_state_dict_strict(self.model, ckpt["state_dict"], source=f"checkpoint {path}")
        self.model.to(device).eval()
        self.device, self.amp, self.config = device, amp, config
        self.class_names = class_names_or_ids(recorded_class_names(ckpt, config.num_classes), config.num_classes)
        self.category_ids = category_ids_or_default(recorded_category_ids(ckpt, config.num_classes),
                                                    config.num_classes)

    @torch.no_grad()
    def detect(self, images: torch.Tensor, records: list, score_thr: float) -> list[Detections]:
        with autocast_for(self.device, self.amp):
            cls_maps, box_maps = self.model(images.to(self.device))
        return postprocess(cls_maps, box_maps, records, self.config.strides, self.config.reg_max,
                           PostprocessConfig(score_thr=score_thr))


def open_detector(path: str, cfg: PredictConfig, device: torch.device):
    """-> (detector, strides, the scale it asks for or None); every check before any pixel is read."""
    if exported_meta(path) is not None:
        if cfg.arch:
            raise UserError(f"{path} is an exported file, which records its architecture; drop the architecture flags")
        detector = ExportedDetector(path, device)
        return detector, detector.strides, detector.img_scale
    ckpt = read_checkpoint(path)
    detector = CheckpointDetector(path, ckpt, cfg.arch, device, cfg.amp)
    return detector, detector.config.strides, trained_img_scale(ckpt)


def result_entries(image_id: int, file_name: str, det: Detections, names: list[str], category_ids: list[int]):
    """One image's detections -> COCO results (xywh in original pixels; category_id the dataset's
    id of the label, as the training run recorded it, else label + 1) with the file and class names."""
    results = detections_to_coco(image_id, det.boxes, det.scores, det.labels, category_ids)
    name_of = dict(zip(category_ids, names))
    return [{"image_id": image_id, "file_name": file_name, "category_id": r["category_id"],
             "category_name": name_of[r["category_id"]], "bbox": r["bbox"], "score": r["score"]} for r in results]


def draw_picture(src: Path, dst: Path, det: Detections, names: list[str], thr: float) -> None:
    """The image with its boxes above thr, each labelled with its class name and score."""
    with Image.open(src) as image:
        picture = Image.fromarray(rgb_pixels(image))
    pen, font = ImageDraw.Draw(picture), ImageFont.load_default()
    width = max(1, round(min(picture.size) / 300))
    for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
        if score <= thr:
            continue
        colour = PALETTE[label % len(PALETTE)]
        pen.rectangle(box, outline=colour, width=width)
        text = f"{names[label]} {score:.2f}"
        left, top, right, bottom = pen.textbbox((box[0], box[1]), text, font=font)
        lift = bottom - top + 2 if box[1] >= bottom - top + 2 else 0  # above the box where there is room
        pen.rectangle((left, top - lift, right + 2, bottom - lift), fill=colour)
        pen.text((box[0] + 1, box[1] - lift), text, fill=(255, 255, 255), font=font)
    picture.save(dst)


def check_out(out: Path) -> None:
    """OUT may hold an earlier predict's results (they are replaced), never another command's
    config.json (a training run's, which --resume reads): a UserError before anything is written."""
    config = out / "config.json"
    if not config.is_file():
        return
    try:
        earlier = json.loads(config.read_text())
    except (OSError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and {"checkpoint", "inputs", "draw_thr"} <= earlier.keys()):
        raise UserError(f"--out {out} holds a config.json that predict did not write (a training run's?); "
                        "pass another --out, such as a folder inside it")


def picture_name(image_id: int, path: Path) -> str:
    """draw/ID_NAME.jpg, NAME cut to fit a file system's 255-byte names."""
    stem = path.stem.encode()[:200].decode(errors="ignore")
    return f"{image_id:06d}_{stem}.jpg"


PICTURE = re.compile(r"\d{6}_.*\.jpg")
NEW_PICTURES = ".new"  # draw/.new/: this run's pictures until its results are written


def replace_pictures(draw: Path) -> None:
    """Put this run's pictures (draw/.new/, none without --draw) in the place of an earlier run's:
    the files predict names ID_NAME.jpg go, anything else a user put in draw/ stays. Done once the
    run's results are written, so an interrupted run leaves the earlier results and pictures whole."""
    new = draw / NEW_PICTURES
    if draw.is_dir():
        for old in draw.iterdir():
            if old.is_file() and PICTURE.fullmatch(old.name):
                old.unlink()
    if new.is_dir():
        for picture in new.iterdir():
            os.replace(picture, draw / picture.name)
        new.rmdir()


def run_predict(checkpoint: str, inputs: list[str], cfg: PredictConfig, progress: bool = True) -> dict:
    """Write cfg.out/{detections,images,config}.json, skipped.txt and (draw) draw/.
    -> {"out", "images", "detections", "skipped": [(path, why)], "notes"}."""
    out = Path(cfg.out)
    check_out(out)
    paths = find_images(inputs, skip=out / "draw")
    device = resolve_device(cfg.device)
    detector, strides, asked = open_detector(checkpoint, cfg, device)
    scale = tuple(cfg.img_scale or asked or DEFAULT_IMG_SCALE)
    notes = []
    if isinstance(detector, ExportedDetector) and cfg.score_thr < detector.meta["score_thr"]:
        notes.append(f"note: {checkpoint} keeps only detections scoring above {detector.meta['score_thr']} (its "
                     "export's --score-thr); export again to keep lower ones")
    skipped: dict[int, str] = {}
    records: dict[int, object] = {}
    for i, path in enumerate(paths):  # sizes from the headers: the views are planned before any pixel is read
        try:
            with Image.open(path) as image:
                width, height = image.size
            records[i] = plan_view(i + 1, (height, width), ViewSpec(False, scale), strides)
        except READ_ERRORS as err:
            skipped[i] = first_line(err)
    order = sorted(records)
    batches = [[order[j] for j in b] for b in canvas_batches([records[i] for i in order], cfg.batch_size)]
    dataset = ImageFiles(paths, [records.get(i) for i in range(len(paths))])
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers,
                                         collate_fn=collate_images)
    pictures = out / "draw" / NEW_PICTURES
    shutil.rmtree(pictures, ignore_errors=True)  # an interrupted run's
    (pictures if cfg.draw else out).mkdir(parents=True, exist_ok=True)
    names = detector.class_names
    detections: dict[int, list[dict]] = {}
    with progress_bar(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
        bar.update(len(skipped))
        for indices, images, unreadable in loader:
            skipped.update(unreadable)
            found = detector.detect(images, [records[i] for i in indices], cfg.score_thr) if indices else []
            for i, det in zip(indices, found):
                detections[i] = result_entries(i + 1, str(paths[i]), det, names, detector.category_ids)
                if cfg.draw:
                    draw_picture(paths[i], pictures / picture_name(i + 1, paths[i]), det, names, cfg.draw_thr)
            bar.update(len(indices) + len(unreadable))
    listed = [i for i in range(len(paths)) if i not in skipped]
    (out / "detections.json").write_text(json.dumps([d for i in listed for d in detections[i]]) + "\n")
    (out / "images.json").write_text(json.dumps([{"id": i + 1, "file_name": str(paths[i]),
                                                  "width": records[i].orig_hw[1], "height": records[i].orig_hw[0]}
                                                 for i in listed]) + "\n")
    (out / "skipped.txt").write_text("".join(f"{paths[i]}\t{skipped[i]}\n" for i in sorted(skipped)))
    (out / "config.json").write_text(json.dumps({"checkpoint": str(checkpoint), "inputs": list(inputs),
                                                 **config_to_dict(cfg), "img_scale": list(scale),
                                                 "class_names": names, "category_ids": detector.category_ids},
                                                indent=2) + "\n")
    replace_pictures(out / "draw")
    return {"out": out, "images": len(listed), "detections": sum(len(detections[i]) for i in listed),
            "skipped": [(paths[i], skipped[i]) for i in sorted(skipped)], "notes": notes}
