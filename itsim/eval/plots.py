"""PNG plots for evaluation and training runs.

Plotting is optional: matplotlib is imported only when a plot is drawn, and if it is missing each
function logs a warning and returns None instead of failing the evaluation. Figures are drawn with
the object-oriented API on an Agg canvas, so no global pyplot state or display is ever touched.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from itsim.eval import metrics

log = logging.getLogger(__name__)


def _figure(width: float = 5.0, height: float = 4.0) -> Any | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed; skipping plots")
        return None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_roc(scores: Any, labels: Any, path: str | Path) -> Path | None:
    """ROC curve with its AUC in the title; the diagonal marks chance."""
    fig = _figure()
    if fig is None:
        return None
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label="model")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC (AUC = {metrics.roc_auc(scores, labels):.3f})")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_score_hist(scores: Any, labels: Any, path: str | Path, threshold: float | None = None) -> Path | None:
    """Score histograms of true and false pairs on shared bins; their overlap is the error."""
    fig = _figure(6.0, 4.0)
    if fig is None:
        return None
    s = np.asarray(metrics._np(scores)).ravel()
    y = np.asarray(metrics._np(labels)).ravel().astype(bool)
    finite = s[np.isfinite(s)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    ax = fig.add_subplot()
    ax.hist(s[y], bins=bins, alpha=0.6, label=f"true pairs ({int(y.sum())})", color="tab:green")
    ax.hist(s[~y], bins=bins, alpha=0.6, label=f"false pairs ({int((~y).sum())})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="match score", ylabel="pairs", title="Scores of true vs false pairs")
    ax.legend()
    return _save(fig, path)


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every parseable JSON object line; broken lines (a run killed mid-write) are skipped and counted."""
    rows, bad = [], 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        log.warning("%s: skipped %d unreadable lines", path, bad)
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows
              if isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(metrics_jsonl_path: str | Path, path: str | Path) -> Path | None:
    """Loss (train and val) and accuracy (train and val) against step; missing series are left out."""
    source = Path(metrics_jsonl_path)
    if not source.is_file():
        log.warning("%s not found; skipping the training curves plot", source)
        return None
    rows = read_metrics_jsonl(source)
    fig = _figure(9.0, 4.0)
    if fig is None:
        return None
    loss_ax, acc_ax = fig.subplots(1, 2)
    drawn = 0
    for ax, series in ((loss_ax, (("loss", "train loss"), ("val_loss", "val loss"))),
                       (acc_ax, (("train_acc", "train accuracy"), ("val_accuracy", "val accuracy"),
                                 ("val_roc_auc", "val ROC-AUC")))):
        for key, label in series:
            steps, values = _series(rows, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=label)
                drawn += 1
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend()
    loss_ax.set(ylabel="loss", title="Loss")
    acc_ax.set(ylabel="accuracy / AUC", title="Accuracy")
    if not drawn:
        log.warning("%s has no step/loss/accuracy values; the training curves plot is empty", source)
    return _save(fig, path)
