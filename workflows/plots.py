"""PNG plots of training runs (loss and AP curves from metrics.jsonl) and of sweeps (AP per setting).
matplotlib's object API with the Agg canvas: no pyplot state, no display needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.errors import UserError

LOSS_KEYS = ("loss", "loss_qfl", "loss_giou", "loss_dfl", "loss_ld", "loss_ld_vlr", "loss_kd")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """-> (loss records, evaluation records) of a run folder."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; pass the --out folder of a train-detector/train-student run")
    texts = [line for line in path.read_text().splitlines() if line.strip()]
    lines = []
    for number, text in enumerate(texts, 1):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            if number == len(texts):
                break  # a run killed while writing its last record
            raise UserError(f"{path} line {number} is not JSON; is this a metrics.jsonl of ldcache?") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} is not a JSON object; is this a metrics.jsonl of ldcache?")
        lines.append(record)
    return [r for r in lines if "loss" in r], [r for r in lines if "AP" in r]


def _save(fig: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    FigureCanvasAgg(fig).print_png(str(tmp))
    os.replace(tmp, out)
    return out


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(run_dirs: list[Path], out: Path, smooth: int = 10) -> Path:
    """Total loss, the distillation terms and AP over training, one line per run."""
    runs = [(Path(d).name, *read_metrics(d)) for d in run_dirs]
    fig = Figure(figsize=(15, 4.2), dpi=100)
    ax_loss, ax_terms, ax_ap = fig.subplots(1, 3)
    for name, losses, evals in runs:
        iters = [r["iter"] for r in losses]
        line = ax_loss.plot(iters, _smooth([r["loss"] for r in losses], smooth), label=name)[0]
        for key, style in (("loss_ld", "-"), ("loss_ld_vlr", "--"), ("loss_kd", ":")):
            if any(key in r for r in losses):
                ax_terms.plot(iters, _smooth([r.get(key, 0.0) for r in losses], smooth), style, color=line.get_color(),
                              label=f"{name} {key}")
        if evals:
            ax_ap.plot([r["epoch"] for r in evals], [100 * r["AP"] for r in evals], "o-", color=line.get_color(),
                       label=name)
    ax_loss.set(title=f"total loss (moving mean of {smooth} records)", xlabel="step")
    ax_terms.set(title="distillation terms (weighted)", xlabel="step")
    ax_ap.set(title="COCO AP on the validation set", xlabel="epoch", ylabel="AP (%)")
    for ax in (ax_loss, ax_terms, ax_ap):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if not ax_terms.lines:
        ax_terms.text(0.5, 0.5, "no distillation terms\n(plain training)", ha="center", va="center",
                      transform=ax_terms.transAxes)
    fig.tight_layout()
    return _save(fig, out)


def plot_sweep(results, out: Path) -> Path:
    """AP (bars) with AP50 and AP75 (markers) for each setting of a sweep, best first."""
    done = sorted([r for r in results if r.metrics], key=lambda r: -r.metrics["AP"])
    labels = [", ".join(f"{k}={v}" for k, v in r.overrides.items()) for r in done]
    fig = Figure(figsize=(max(6.0, 0.9 * len(done) + 2), 4.5), dpi=100)
    ax = fig.subplots()
    xs = range(len(done))
    ax.bar(xs, [100 * r.metrics["AP"] for r in done], color="#4c72b0", label="AP")
    ax.plot(xs, [100 * r.metrics["AP50"] for r in done], "o", color="#dd8452", label="AP50")
    ax.plot(xs, [100 * r.metrics["AP75"] for r in done], "s", color="#55a868", label="AP75")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="%", title="student AP per setting (one teacher cache)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)
