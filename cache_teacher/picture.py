"""The LD paper's figure 1 for one cached view: boxes on the image, and the teacher's four edge distributions.

A clear edge gives a sharp distribution over the distance bins (one peak, entropy near 0); an
ambiguous edge (blur, occlusion) gives a flat or bimodal one (entropy up to log(bins)). That
difference is the knowledge LD transfers, so `inspect-cache --png` draws it.

Matplotlib is used through `Figure` + `FigureCanvasAgg`, never pyplot: no global figure registry to
leak into, no interactive backend to pick up from the environment."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

EDGE_NAMES = ("left", "top", "right", "bottom")  # order of the 4 rows of the box branch
GT_COLOR = "#00c853"
DET_COLOR = "#ff9100"
HIGHLIGHT_COLOR = "#d50000"
DPI = 100  # a 1333x800 photo view stays a few hundred KB as PNG
CAPTION = ("Bars: softmax(edge logits / T) over distance bins, in stride units from the location to the edge. "
           "Sharp = confident edge, flat or two peaks = ambiguous edge (blur, occlusion). H = entropy in nats.")


def edge_softmax(edge_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """[4, bins] logits -> [4, bins] probabilities, softmax(logits / T) per edge."""
    scaled = np.asarray(edge_logits, dtype=np.float64) / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)  # stable: exp never overflows
    weights = np.exp(scaled)
    return weights / weights.sum(axis=-1, keepdims=True)


def edge_entropy(edge_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """[4, bins] logits -> [4] entropy (nats) of softmax(logits / T): 0 for one sharp peak, log(bins) for flat."""
    probs = edge_softmax(edge_logits, temperature)
    log_probs = np.log(np.clip(probs, 1e-300, None))  # 0 * log 0 = 0: clipped terms are multiplied by ~0
    return -(probs * log_probs).sum(axis=-1)


def render_view(out_path, image_rgb: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                det_boxes: np.ndarray, det_scores: np.ndarray, det_labels: np.ndarray,
                edge_logits: np.ndarray, edge_box: np.ndarray, class_names: Sequence[str],
                title: str = "", temperature: float = 1.0) -> Path:
    """Draw one view (image with GT, detections and the highlighted box; 2x2 edge distributions) to a PNG.

    All boxes are xyxy in the pixels of `image_rgb` [H, W, 3] uint8 (the view as the network saw it).
    `edge_logits` [4, bins] belongs to the location chosen for `edge_box`. Returns the written path."""
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image_rgb must be [H, W, 3], got {image_rgb.shape}")
    edge_logits = np.asarray(edge_logits, dtype=np.float64)
    if edge_logits.ndim != 2 or edge_logits.shape[0] != 4:
        raise ValueError(f"edge_logits must be [4, bins], got {edge_logits.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    height, width = image_rgb.shape[:2]

    # The image panel takes the image's aspect; the 2x2 bar grid keeps a fixed ~6.5 x 5.5 in.
    fig_height = 5.5
    image_width = min(max(fig_height * 0.9 * width / height, 4.0), 9.0)
    fig = Figure(figsize=(image_width + 6.5, fig_height), dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, width_ratios=[image_width, 3.25, 3.25], left=0.02, right=0.98,
                            top=0.88, bottom=0.17, wspace=0.25, hspace=0.6)

    ax_image = fig.add_subplot(grid[:, 0])
    _draw_image(ax_image, image_rgb, gt_boxes, gt_labels, det_boxes, det_scores, det_labels, edge_box,
                class_names)

    probs = edge_softmax(edge_logits, temperature)  # [4, bins]
    entropies = edge_entropy(edge_logits, temperature)  # [4]
    bins = np.arange(edge_logits.shape[1])
    for edge, name in enumerate(EDGE_NAMES):
        ax = fig.add_subplot(grid[edge // 2, 1 + edge % 2])
        expected = float((probs[edge] * bins).sum())
        ax.bar(bins, probs[edge], width=0.8, color="#1565c0")
        ax.axvline(expected, color=HIGHLIGHT_COLOR, linestyle="--", linewidth=1)
        ax.set_ylim(0.0, 1.0)  # same scale on every edge, so sharp and flat compare at a glance
        ax.set_xlim(-0.6, bins[-1] + 0.6)
        ax.set_xticks(bins[::2])
        ax.tick_params(labelsize=8)
        ax.set_title(f"{name}: H={entropies[edge]:.2f} nats, E[d]={expected:.2f}", fontsize=9)
        ax.set_xlabel("distance bin (stride units)", fontsize=8)

    heading = title or "Teacher box distributions"
    fig.suptitle(f"{heading}  (T={temperature:g})", fontsize=11)
    fig.text(0.5, 0.03, CAPTION, ha="center", va="bottom", fontsize=8, wrap=True)
    return _save_atomic(fig, Path(out_path))


def _draw_image(ax, image_rgb, gt_boxes, gt_labels, det_boxes, det_scores, det_labels, edge_box, class_names):
    """Image with GT (thin dashed), detections ("name score") and the highlighted detection (thick)."""
    height, width = image_rgb.shape[:2]
    ax.imshow(image_rgb, interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # image rows grow downwards
    ax.set_axis_off()
    font = 8  # points on the figure, whose size does not depend on the image's pixels

    for box, label in zip(np.asarray(gt_boxes).reshape(-1, 4), np.asarray(gt_labels).reshape(-1)):
        _box(ax, box, GT_COLOR, linewidth=1.2, linestyle="--")
        # GT names sit inside the bottom-left corner so they never cover a detection's label above its box
        ax.text(box[0], box[3], _name(class_names, label), fontsize=font - 1, color="black", va="bottom",
                ha="left", clip_on=True, bbox=dict(facecolor=GT_COLOR, alpha=0.7, edgecolor="none", pad=1))
    for box, score, label in zip(np.asarray(det_boxes).reshape(-1, 4), np.asarray(det_scores).reshape(-1),
                                 np.asarray(det_labels).reshape(-1)):
        _box(ax, box, DET_COLOR, linewidth=1.5)
        ax.text(box[0], box[1], f"{_name(class_names, label)} {float(score):.2f}", fontsize=font, color="black",
                va="bottom", ha="left", clip_on=True,
                bbox=dict(facecolor=DET_COLOR, alpha=0.8, edgecolor="none", pad=1))
    _box(ax, np.asarray(edge_box).reshape(4), HIGHLIGHT_COLOR, linewidth=3.0)

    handles = [Rectangle((0, 0), 1, 1, fill=False, edgecolor=GT_COLOR, linestyle="--", label="GT"),
               Rectangle((0, 0), 1, 1, fill=False, edgecolor=DET_COLOR, label="teacher det."),
               Rectangle((0, 0), 1, 1, fill=False, edgecolor=HIGHLIGHT_COLOR, linewidth=2.5,
                         label="edges plotted")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3, fontsize=8, handlelength=1.5,
              frameon=False)


def _box(ax, box_xyxy, color, linewidth, linestyle="-"):
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth,
                           linestyle=linestyle))


def _name(class_names, label) -> str:
    label = int(label)
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def _save_atomic(fig: Figure, out_path: Path) -> Path:
    """PNG to a temp file beside out_path, then os.replace: a reader never sees half a file."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name opened with "xb" rather than mkstemp, whose 0600 mode would survive the rename
    tmp_name = out_path.parent / f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp_name, "xb") as handle:
            fig.savefig(handle, format="png", dpi=DPI)
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path
