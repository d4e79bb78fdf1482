"""Classification metrics for long-tailed sets, computed once from gathered predictions.

Per-class figures (recall, group accuracies, confusion matrix) must come from all predictions of a split in one
place, never from per-worker averages: the engine gathers ``(y_true, probs)`` and calls :func:`compute_metrics`.
scikit-learn computes what it has (macro-F1, AUC, confusion matrix); the rest is a few lines of numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score, roc_auc_score

GROUP_RULES = ("rank", "count")
GROUPS = ("many", "medium", "few")


def _as_counts(train_counts: Sequence[int] | Mapping[str, int] | np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    if isinstance(train_counts, Mapping):
        missing = [c for c in class_names if c not in train_counts]
        if missing:
            raise ValueError(f"train_counts has no entry for classes {missing}; give a count for every class")
        counts = np.array([train_counts[c] for c in class_names])
    else:
        counts = np.asarray(train_counts)
    if counts.shape != (len(class_names),):
        raise ValueError(f"train_counts has shape {counts.shape}, expected ({len(class_names)},), one per class")
    if (counts < 0).any():
        raise ValueError(f"train_counts must be >= 0, got {counts.tolist()}")
    return counts.astype(np.int64)


def class_groups(
    train_counts: Sequence[int] | Mapping[str, int] | np.ndarray,
    class_names: Sequence[str],
    rule: str = "rank",
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> dict[str, list[int]]:
    """Split class indices into many / medium / few shot groups by training count.

    ``rank``: classes sorted by count (descending; ties by class index); the first ``ceil(C/3)`` are many, the
    last ``ceil(C/3)`` few, the rest medium (with C < 3 the groups cannot all be filled: C = 1 is only many,
    C = 2 many and few). ``count`` (ImageNet-LT convention): many ``n > many_threshold``, few
    ``n < few_threshold``, medium otherwise. Each group lists indices in descending count order.

    Raises:
        ValueError: unknown rule, or counts not one per class.
    """
    counts = _as_counts(train_counts, class_names)
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))
    if rule == "rank":
        c = len(order)
        k = math.ceil(c / 3)
        return {"many": order[:k], "medium": order[k : max(k, c - k)], "few": order[max(k, c - k) :]}
    if rule == "count":
        return {
            "many": [i for i in order if counts[i] > many_threshold],
            "medium": [i for i in order if few_threshold <= counts[i] <= many_threshold],
            "few": [i for i in order if counts[i] < few_threshold],
        }
    raise ValueError(f"unknown group_rule {rule!r}; use one of {list(GROUP_RULES)}")


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al., arXiv 1706.04599) of the top-1 prediction with equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``, bins ``(i/n, (i+1)/n]``; ``y_true (N,)``, ``probs (N, C)``.
    """
    if n_bins < 1:
        raise ValueError(f"ece_bins must be >= 1, got {n_bins}")
    conf = probs.max(axis=1)  # (N,)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)  # (N,)
    # Right-closed bins: conf in ((b-1)/n, b/n] -> bin b-1. The 1e-9 slack keeps a confidence that sits exactly on
    # an edge in the lower bin despite rounding (0.7 * 10 == 7.000000000000001).
    bins = np.clip(np.ceil(conf * n_bins - 1e-9).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        m = bins == b
        ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    train_counts: Sequence[int] | Mapping[str, int],
    group_rule: str = "rank",
    many_threshold: int = 100,
    few_threshold: int = 20,
    ece_bins: int = 15,
) -> dict[str, Any]:
    """Every evaluation figure of METHODS.md for one split, as plain JSON-serialisable Python values.

    Args:
        y_true: true class indices ``(N,)`` in ``[0, C)``.
        probs: predicted class probabilities ``(N, C)`` (softmax; rows sum to 1); prediction = argmax.
        class_names: ``C`` names, in index order.
        train_counts: training images per class, ``(C,)`` in index order or a name -> count mapping.
        group_rule: ``rank`` or ``count`` (see :func:`class_groups`); thresholds apply to ``count``.
        ece_bins: number of equal-width confidence bins for the ECE.

    Returns a dict with:
        ``accuracy``; ``balanced_accuracy`` (mean recall over classes present in ``y_true``, as scikit-learn);
        ``macro_f1`` (scikit-learn, over classes in ``y_true`` or predicted, ``zero_division=0``);
        ``auc_ovr_macro`` (one-vs-rest macro ROC AUC over the classes present in ``y_true``; classes absent from
        ``y_true`` have no AUC and are listed in ``auc_excluded_classes``; null when fewer than two classes are
        present) and ``per_class_auc``; ``many_accuracy`` / ``medium_accuracy`` / ``few_accuracy`` (mean recall
        of the group's classes present in ``y_true``; null when there are none, never 0) and ``groups``
        (class names per group); ``per_class_recall`` and ``per_class_support`` by class name (recall null for
        an absent class); ``ece``; ``confusion_matrix`` (``C x C``, rows true, columns predicted);
        and the inputs that define them (``class_names``, ``train_counts``, ``group_rule``, ``ece_bins``,
        ``n_samples``).

    Raises:
        ValueError: shapes that do not agree, labels out of range, or probabilities that are not a distribution.
    """
    names = [str(c) for c in class_names]
    n_classes = len(names)
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of class indices, got shape {y.shape}")
    if p.shape != (y.size, n_classes):
        raise ValueError(f"probs has shape {p.shape}, expected (N, C) = ({y.size}, {n_classes})")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true has labels outside [0, {n_classes}): min {y.min()}, max {y.max()}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs must be finite, non-negative, and rows must sum to 1; pass softmax(logits)")
    counts = _as_counts(train_counts, names)

    y_pred = p.argmax(axis=1)  # (N,)
    labels = list(range(n_classes))
    cm = sk_confusion_matrix(y, y_pred, labels=labels)  # (C, C)
    support = cm.sum(axis=1)  # (C,)
    present = [c for c in labels if support[c] > 0]
    recall: list[float | None] = [float(cm[c, c] / support[c]) if support[c] > 0 else None for c in labels]

    per_class_auc: list[float | None] = [None] * n_classes
    auc: float | None = None
    if len(present) >= 2:
        onehot = (y[:, None] == np.array(present)[None, :]).astype(np.int64)  # (N, |present|)
        # Multilabel-indicator form = one binary AUC per present class; with every class present this equals
        # roc_auc_score(y, p, multi_class='ovr', average='macro').
        aucs = roc_auc_score(onehot, p[:, present], average=None)
        for c, a in zip(present, np.atleast_1d(aucs)):
            per_class_auc[c] = float(a)
        auc = float(np.mean(aucs))

    groups = class_groups(counts, names, rule=group_rule, many_threshold=many_threshold, few_threshold=few_threshold)
    group_acc = {g: _mean_or_none([r for i in groups[g] if (r := recall[i]) is not None]) for g in GROUPS}

    return {
        "n_samples": int(y.size),
        "class_names": names,
        "train_counts": {n: int(c) for n, c in zip(names, counts)},
        "accuracy": float(np.mean(y_pred == y)),
        "balanced_accuracy": float(np.mean([recall[c] for c in present])),
        "macro_f1": float(f1_score(y, y_pred, average="macro", zero_division=0)),
        "auc_ovr_macro": auc,
        "auc_excluded_classes": [names[c] for c in labels if support[c] == 0],
        "per_class_auc": dict(zip(names, per_class_auc)),
        "group_rule": group_rule,
        "groups": {g: [names[i] for i in groups[g]] for g in GROUPS},
        "many_accuracy": group_acc["many"],
        "medium_accuracy": group_acc["medium"],
        "few_accuracy": group_acc["few"],
        "per_class_recall": dict(zip(names, recall)),
        "per_class_support": {n: int(s) for n, s in zip(names, support)},
        "ece": expected_calibration_error(y, p, n_bins=ece_bins),
        "ece_bins": int(ece_bins),
        "confusion_matrix": [[int(v) for v in row] for row in cm],
    }
