"""detector/agreement.py: two runtimes' detections agree when every difference is a decision on a
threshold taken the other way by rounding, and disagree on anything else; `ldcache export` of an
untrained light-weight student, whose boxes meet at the NMS threshold exactly, is kept."""

import torch

from detector import ModelConfig, build_detector, save_checkpoint
from detector.agreement import compare
from tests.conftest import TINY_MODEL
from workflows.export import ExportConfig, run_export

IOU_THR, SCORE_THR, TOL = 0.6, 0.05, 1e-3
# Boxes of class 0: A and B overlap at IoU 128*144 / (192*160) = 0.6 exactly, C overlaps B at
# 0.75 and A at 0.45 (below the threshold); D, of class 1, overlaps nothing.
A, B, C, D = [0, 0, 192, 160], [0, 0, 128, 144], [0, 0, 128, 108], [300, 300, 340, 350]


def dets(*rows, k=6):
    """(box, score, label) rows -> one image's fixed-size lists, batched [1, K, ...]."""
    boxes, scores, labels = torch.zeros(1, k, 4), torch.zeros(1, k), torch.full((1, k), -1, dtype=torch.long)
    for n, (box, score, label) in enumerate(rows):
        boxes[0, n], scores[0, n], labels[0, n] = torch.as_tensor(box, dtype=torch.float), score, label
    return boxes, scores, labels


def problems(got, expected):
    return compare(got, expected, IOU_THR, SCORE_THR, TOL)[1]


def test_the_same_lists_agree_and_rounding_is_measured():
    expected = dets((A, 0.9, 0), (D, 0.5, 1))
    got = dets((torch.tensor(A) + 3e-5, 0.9 - 2e-5, 0), (D, 0.5, 1))
    diff, lines = compare(got, expected, IOU_THR, SCORE_THR, TOL)
    assert lines == [] and 2e-5 <= diff < 4e-5


def test_a_box_suppressed_at_the_exact_threshold_and_the_box_it_then_spared_agree():
    # One runtime rounds IoU(A, B) above 0.6 and drops B, so C, which B would have suppressed, is kept.
    expected = dets((A, 0.9, 0), (B, 0.8, 0), (D, 0.5, 1))
    got = dets((A, 0.9, 0), (C, 0.7, 0), (D, 0.5, 1))
    assert problems(got, expected) == []
    assert problems(expected, got) == []


def test_detections_at_the_score_threshold_or_the_tail_of_a_full_list_agree():
    assert problems(dets((A, 0.9, 0)), dets((A, 0.9, 0), (D, SCORE_THR + 5e-4, 1))) == []
    full = [(A, 0.9, 0), (D, 0.5, 1), ([500, 0, 540, 40], 0.4, 1)]
    assert problems(dets(*full[:2], ([600, 0, 640, 40], 0.4, 1), k=3), dets(*full, k=3)) == []


def test_a_shifted_box_another_label_or_a_lost_detection_disagree():
    expected = dets((A, 0.9, 0), (B, 0.8, 0), (D, 0.5, 1))
    shifted = dets((A, 0.9, 0), (B, 0.8, 0), ([302, 300, 342, 350], 0.5, 1))
    relabelled = dets((A, 0.9, 0), (B, 0.8, 0), (D, 0.5, 2))
    lost = dets((A, 0.9, 0), (B, 0.8, 0))
    rescored = dets((A, 0.9, 0), (B, 0.8, 0), (D, 0.45, 1))
    for got in (shifted, relabelled, lost, rescored):
        assert len(problems(got, expected)) == 1
    # a box moved past the threshold is no rounding: A and a B' that overlaps it at 0.5
    assert problems(dets((A, 0.9, 0)), dets((A, 0.9, 0), ([0, 0, 128, 120], 0.8, 0))) != []


def test_export_keeps_an_untrained_student_whose_boxes_tie_at_the_nms_threshold(tmp_path):
    """A tiny MobileNetV2 student with a spread class bias (seed 1): its eager and TorchScript lists
    differ where two boxes overlap at exactly 0.6; the export used to refuse its own file."""
    torch.manual_seed(1)
    tiny = {k: v for k, v in TINY_MODEL.items() if k not in ("depth", "base_width")}
    config = ModelConfig(num_classes=5, backbone="mobilenet_v2", **tiny)
    model = build_detector(config).eval()
    with torch.no_grad():
        model.bbox_head.gfl_cls.bias.normal_(0, 1)
    save_checkpoint(tmp_path / "tied.pt", model, config)
    out = run_export(str(tmp_path / "tied.pt"), ExportConfig(format="torchscript"))
    assert out["out"].exists() and out["max_diff"] <= TOL
