"""Evaluation plots as PNG files at any URI: confusion matrix and per-class recall against training count.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state, no display needed, safe in Ray
workers), rendered to bytes in memory and written with :func:`ltcore.storage.write_bytes`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ltcore import storage


def save_figure(fig: Figure, path_uri: str, dpi: int = 120) -> str:
    """Render ``fig`` as PNG to any storage URI (no pyplot state); returns the URI."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    storage.write_bytes(path_uri, buf.getvalue())
    return path_uri


def plot_confusion(
    cm: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], path_uri: str, normalize: bool = True
) -> str:
    """Confusion matrix ``(C, C)`` (rows true, columns predicted) as a PNG at ``path_uri``; returns the URI.

    With ``normalize`` the colours are row-normalised (per-class recall on the diagonal), so rare classes are as
    visible as frequent ones; the cells are annotated with raw counts.

    Raises:
        ValueError: ``cm`` not square or not matching ``class_names``.
    """
    m = np.asarray(cm, dtype=np.float64)
    n = len(class_names)
    if m.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {m.shape}, expected ({n}, {n}) for the class names given")
    rows = m.sum(axis=1, keepdims=True)
    shown = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) if normalize else m
    size = max(4.0, 0.6 * n + 2.0)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:  # beyond that the numbers are unreadable
        top = shown.max() if shown.size else 0.0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if shown[i, j] > 0.5 * top else "black")
    return save_figure(fig, path_uri)


def plot_recall_vs_count(
    per_class_recall: Mapping[str, float | None],
    train_counts: Mapping[str, int] | Sequence[int],
    path_uri: str,
) -> str:
    """Per-class recall against training count (log x) as a PNG at ``path_uri``; returns the URI.

    ``train_counts`` is a name -> count mapping or a sequence in the order of ``per_class_recall``. Classes with
    no recall (absent from the evaluated split) or no training images are left out.
    """
    names = list(per_class_recall)
    if isinstance(train_counts, Mapping):
        missing = [c for c in names if c not in train_counts]
        if missing:
            raise ValueError(f"train_counts has no entry for classes {missing}")
        counts = [int(train_counts[c]) for c in names]
    else:
        counts = [int(c) for c in train_counts]
        if len(counts) != len(names):
            raise ValueError(f"train_counts has {len(counts)} entries but per_class_recall has {len(names)} classes")
    pts = [(c, float(r), name) for name, c, r in zip(names, counts, per_class_recall.values())
           if r is not None and c > 0]
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    if pts:
        xs, ys, _ = zip(*pts)
        ax.scatter(xs, ys, color="tab:blue")
        for x, y, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("recall")
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path_uri)
