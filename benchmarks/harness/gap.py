"""The teacher's lead over a student split into boxes and scores (studies/gap_decomposition.py,
ld_defaults): both models over the same views, their outputs swapped location by location."""

from __future__ import annotations

import torch

from data.coco import CocoDetection, collate
from data.views import ViewSpec
from detector.checkpoint import load_model
from detector.evaluation import coco_evaluate
from detector.inference import canvas_batches, coco_detections

KEYS = ("AP", "AP50", "AP75", "APs")
COMBOS = {  # name -> (whose class logits, whose box logits)
    "student": ("student", "student"), "teacher": ("teacher", "teacher"),
    "student scores + teacher boxes": ("student", "teacher"), "teacher scores + student boxes": ("teacher", "student"),
}


@torch.no_grad()
def predictions(teacher_path: str, student_path: str, images: str, ann: str, img_scale: tuple[int, int],
                batch_size: int = 8) -> tuple[CocoDetection, dict[str, list[dict]]]:
    """-> (the dataset, {combo: COCO result dicts sorted by image}) for every entry of COMBOS."""
    models = {"teacher": load_model(teacher_path, role="teacher")[0],
              "student": load_model(student_path, role="student")[0]}
    configs = {k: m.config for k, m in models.items()}
    if (configs["teacher"].strides != configs["student"].strides
            or configs["teacher"].reg_max != configs["student"].reg_max):
        raise SystemExit("error: teacher and student differ in strides or reg_max; their outputs do not line up")
    config = configs["student"]
    dataset = CocoDetection(images, ann, views=[ViewSpec(False, img_scale)], strides=config.strides, train=False)
    records = [dataset.view_record(i, 0) for i in range(len(dataset))]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[[(i, 0) for i in b] for b in canvas_batches(records, batch_size)], collate_fn=collate)

    def outputs():
        for batch in loader:
            maps = {k: m(batch.images) for k, m in models.items()}  # (cls per level, box per level)
            yield batch.records, {name: (maps[cls_from][0], maps[box_from][1])
                                  for name, (cls_from, box_from) in COMBOS.items()}

    results = coco_detections(outputs(), config.strides, config.reg_max, dataset.label_to_cat_id)
    return dataset, {name: results.get(name, []) for name in COMBOS}


def decompose(teacher_path: str, student_path: str, images: str, ann: str, img_scale: tuple[int, int],
              batch_size: int = 8) -> dict[str, dict]:
    """-> {combo: COCO metrics} for every entry of COMBOS."""
    dataset, results = predictions(teacher_path, student_path, images, ann, img_scale, batch_size)
    return {name: coco_evaluate(ann, r, image_ids=dataset.image_ids) for name, r in results.items()}


def shares(metrics: dict[str, dict], key: str = "AP") -> dict[str, float | None]:
    """Share of the teacher - student gap in `key` that each swap recovers."""
    s, t = metrics["student"][key], metrics["teacher"][key]
    gap = t - s
    return {name: (m[key] - s) / gap if gap > 0 else None for name, m in metrics.items() if "+" in name}
