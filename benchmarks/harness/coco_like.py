"""COCO train2017's published statistics as an annotation file (no images): what the benchmarks
at COCO's geometry measure against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# COCO train2017 in published figures: 118k images of mostly 640x480 (long side 640), 860k boxes
# (7.3 per image), 41% small (< 32^2 px), 34% medium, 24% large (> 96^2 px), 80 categories.
COCO_OBJECTS_PER_IMAGE = 7.3
# (share, min side, max side) of sqrt(area)
COCO_SIZE_MIX = ((0.41, 4.0, 32.0), (0.34, 32.0, 96.0), (0.24, 96.0, 480.0))
COCO_NUM_CLASSES = 80


def write_coco_like(num_images: int, path: Path, seed: int) -> Path:
    """An annotation file with COCO train2017's published statistics (no image files)."""
    import json

    rng = np.random.default_rng(seed)
    images, annotations = [], []
    shares = np.array([m[0] for m in COCO_SIZE_MIX])
    for image_id in range(1, num_images + 1):
        w, h = (640, 480) if rng.random() < 0.75 else (480, 640)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h})
        count = rng.geometric(1.0 / COCO_OBJECTS_PER_IMAGE)  # >= 1: training keeps non-empty images
        for _ in range(count):
            _, lo, hi = COCO_SIZE_MIX[rng.choice(len(shares), p=shares / shares.sum())]
            side = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))  # sqrt(area), log-uniform in its bin
            ratio = float(np.exp(rng.normal(0.0, 0.6)))  # width / height
            bw, bh = min(side * np.sqrt(ratio), w), min(side / np.sqrt(ratio), h)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.integers(1, 81)),
                                "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                                "area": round(bw * bh, 2), "iscrowd": 0})
    categories = [{"id": i, "name": f"class{i}"} for i in range(1, COCO_NUM_CLASSES + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path
