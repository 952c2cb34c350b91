"""The figure-1 picture of one cached view: a readable PNG, entropy of edge distributions, no leaked figures."""

import math
import subprocess
import sys

import numpy as np
from PIL import Image

from cache_teacher.picture import edge_entropy, render_view
from tests.conftest import ROOT

BINS = 17


def _sharp_and_flat_logits():
    """left/top sharp (one bin +20), right flat, bottom bimodal: [4, 17]."""
    logits = np.zeros((4, BINS))
    logits[0, 3] = 20.0
    logits[1, 7] = 20.0
    logits[3, [2, 9]] = 5.0
    return logits


def _render(path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    gt_boxes = np.array([[10.0, 12.0, 60.0, 80.0], [80.0, 30.0, 150.0, 110.0]])
    det_boxes = np.array([[12.0, 10.0, 58.0, 82.0], [78.0, 33.0, 149.0, 108.0], [5.0, 5.0, 40.0, 40.0]])
    return render_view(path, image, gt_boxes, np.array([0, 1]), det_boxes, np.array([0.9, 0.7, 0.2]),
                       np.array([0, 1, 0]), _sharp_and_flat_logits(), det_boxes[0], ["person", "car"],
                       title="view 0", temperature=1.0)


def test_render_view_writes_a_readable_png(tmp_path):
    out = _render(tmp_path / "nested" / "view.png")
    assert out == tmp_path / "nested" / "view.png" and out.exists()  # parent folder created
    assert [p.name for p in out.parent.iterdir()] == ["view.png"]  # the atomic write left no temp file
    with Image.open(out) as png:
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"), dtype=np.float64)
    # image panel + 2x2 bar grid side by side: a wide figure, well over 600 px at 120 dpi
    assert width > height and width > 600
    assert pixels.var() > 0  # something was drawn, not a blank canvas
    assert out.stat().st_size < 500_000  # a few hundred KB at most


def test_render_view_never_touches_pyplot(tmp_path):
    _render(tmp_path / "view.png")
    # Figure + FigureCanvasAgg keep no global registry; if pyplot was imported elsewhere it must hold nothing
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    # and the module itself never imports pyplot (a fresh interpreter, since another test may have imported it)
    check = "import sys, cache_teacher.picture; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True)


def test_edge_entropy_sharp_is_near_zero():
    logits = np.zeros((4, BINS))
    logits[:, 5] = 20.0
    # the peak holds 1 / (1 + 16 e^-20) of the mass: entropy ~ 16 * 20 * e^-20 ~ 7e-7 nats
    np.testing.assert_allclose(edge_entropy(logits), 0.0, atol=1e-5)


def test_edge_entropy_flat_is_log_bins():
    # equal logits give the uniform distribution, whose entropy is log(number of bins)
    np.testing.assert_allclose(edge_entropy(np.full((4, BINS), 3.0)), math.log(BINS), rtol=1e-12)


def test_edge_entropy_temperature_flattens():
    logits = _sharp_and_flat_logits()
    cold, hot = edge_entropy(logits, 1.0), edge_entropy(logits, 10.0)
    # dividing by T = 10 shrinks the +20 peak to +2, spreading mass over the other bins
    assert hot[0] > cold[0] + 1.0
    # a flat row stays flat at any temperature: log(17) both ways
    np.testing.assert_allclose([cold[2], hot[2]], math.log(BINS), rtol=1e-12)
    assert edge_entropy(logits).shape == (4,)  # one entropy per edge
