"""COCO evaluation: results json, pycocotools metrics, restricting images, atomic saves."""

import json

import pytest
import torch

from core.errors import UserError
from data.coco_json import load_coco
from detector.evaluation import (
    METRIC_NAMES,
    coco_evaluate,
    detections_to_coco,
    format_metrics_table,
    save_results,
)

LABEL_TO_CAT_ID = [5, 9]  # non-contiguous COCO ids: label 0 -> 5, label 1 -> 9
# image id -> [(category id, xywh)]; areas cover small (< 32^2), medium and large (> 96^2)
GROUND_TRUTH = {
    1: [(5, [10, 10, 20, 20]), (9, [50, 50, 60, 60])],
    2: [(9, [20, 20, 150, 120]), (5, [200, 200, 40, 40])],
    3: [(5, [5, 5, 10, 10])],
}


@pytest.fixture
def ann_file(tmp_path):
    objects = [(image_id, cat, box) for image_id, objs in GROUND_TRUTH.items() for cat, box in objs]
    annotations = [
        {"id": k, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for k, (i, c, b) in enumerate(objects, start=1)
    ]
    images = [{"id": i, "file_name": f"{i}.png", "width": 300, "height": 300} for i in GROUND_TRUTH]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 9, "name": "dog"}, {"id": 5, "name": "cat"}],
    }))
    return path


def _results(shift_fraction=0.0, image_ids=tuple(GROUND_TRUTH)):
    """Detections = ground truth boxes (score 1), shifted right by a fraction of their width."""
    results = []
    for image_id in image_ids:
        objs = GROUND_TRUTH[image_id]
        xywh = torch.tensor([box for _, box in objs], dtype=torch.float32)
        x1 = xywh[:, 0] + shift_fraction * xywh[:, 2]
        y1 = xywh[:, 1]
        xyxy = torch.stack([x1, y1, x1 + xywh[:, 2], y1 + xywh[:, 3]], dim=1)
        labels = torch.tensor([LABEL_TO_CAT_ID.index(cat) for cat, _ in objs])
        scores = torch.ones(len(objs))
        results += detections_to_coco(image_id, xyxy, scores, labels, LABEL_TO_CAT_ID)
    return results


def test_detections_to_coco_maps_labels_back_and_writes_xywh():
    boxes = torch.tensor([[10.12345, 20.0, 30.5, 60.0], [0.0, 0.0, 1.0, 2.0]])
    scores, labels = torch.tensor([0.9, 0.25]), torch.tensor([1, 0])
    out = detections_to_coco(7, boxes, scores, labels, LABEL_TO_CAT_ID)
    assert [d["category_id"] for d in out] == [9, 5]  # label 1 -> id 9, label 0 -> id 5
    assert out[0]["bbox"] == [10.123, 20.0, 20.377, 40.0]  # xywh, rounded to 1/1000 px
    assert out[0]["image_id"] == 7 and out[0]["score"] == pytest.approx(0.9, abs=1e-6)
    json.dumps(out)  # plain Python types only
    nothing = torch.zeros(0, dtype=torch.long)
    assert detections_to_coco(7, torch.zeros(0, 4), torch.zeros(0), nothing, [5]) == []


def test_perfect_detections_give_ap_one(ann_file):
    metrics = coco_evaluate(ann_file, _results())
    # every ground truth box is found with IoU 1 and nothing else is detected (pycocotools divides
    # by tp + fp + eps, hence approx)
    assert metrics == pytest.approx({name: 1.0 for name in METRIC_NAMES}, abs=1e-9)


def test_shifted_detections_score_lower(ann_file):
    metrics = coco_evaluate(ann_file, _results(shift_fraction=0.2))
    # a 20% shift gives IoU 0.8 / 1.2 = 0.667: matched at thresholds 0.50, 0.55, 0.60, 0.65 of ten
    assert metrics["AP50"] == pytest.approx(1.0, abs=1e-9) and metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(0.4)


def test_no_detections_give_zeros(ann_file):
    # pycocotools' loadRes cannot take []; no detections at all is AP 0
    assert coco_evaluate(ann_file, []) == {name: 0.0 for name in METRIC_NAMES}


def test_restricting_image_ids(ann_file):
    results = _results(image_ids=(1,))
    coco = load_coco(ann_file)
    everything = coco_evaluate(coco, results)
    assert everything["AP"] < 1.0  # images 2 and 3 have ground truth but no detections
    only_first = coco_evaluate(coco, results, image_ids=[1])
    assert [only_first[n] for n in ("AP", "APs", "APm")] == pytest.approx([1.0, 1.0, 1.0], abs=1e-9)
    assert only_first["APl"] == -1.0  # image 1 has no large box: pycocotools' "undefined"
    assert coco_evaluate(coco, results, image_ids=[2, 3]) == {name: 0.0 for name in METRIC_NAMES}
    assert "area" not in results[0]  # the caller's dicts are not mutated by loadRes


def test_results_for_unknown_images_are_a_user_error(ann_file):
    with pytest.raises(UserError, match="not in the ground truth"):
        stray = {"image_id": 99, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1.0}
        coco_evaluate(ann_file, _results() + [stray])


def test_format_metrics_table_prints_percent():
    metrics = {"AP": 0.4213, "AP50": 0.603, "AP75": 0.456, "APs": 0.245, "APm": 0.462, "APl": -1.0}
    table = format_metrics_table(metrics)
    header, values = table.splitlines()
    assert header.split() == list(METRIC_NAMES)
    # percent with one decimal; -1 (no ground truth in that range) prints as "-"
    assert values.split() == ["42.1", "60.3", "45.6", "24.5", "46.2", "-"]


def test_save_results_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "out" / "results.json"
    save_results(path, [{"image_id": 1}])
    save_results(path, _results())  # replaces the previous file
    assert json.loads(path.read_text()) == _results()
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left


def test_ground_truth_without_area_or_iscrowd_evaluates(tmp_path):
    import json

    from detector.evaluation import coco_evaluate

    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
          "categories": [{"id": 3, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 30]}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    results = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 30], "score": 0.9}]
    # Converters often omit area and iscrowd; a perfect detection must still score AP 1.
    assert coco_evaluate(path, results)["AP"] == pytest.approx(1.0)
