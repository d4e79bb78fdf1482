"""Engine test helpers."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from ltcore.engine.checkpoint import PRED_FILE


@pytest.fixture()
def check_report() -> Callable[[dict], None]:
    return check_report_against_predictions


def check_report_against_predictions(report: dict) -> None:
    """The report's test metrics are those of the final model's saved predictions (recomputed with
    scikit-learn), and the final loss is a finite number (NaN is written as null)."""
    pred = np.load(Path(report["model"]) / PRED_FILE)
    y, p = pred["test_labels"], pred["test_probs"].argmax(1)
    test = report["metrics"]["test"]
    assert test["n_samples"] == len(y) > 0
    assert test["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p), abs=1e-9)
    assert test["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-9)
    loss = report["stages"]["stage1"]["last_metrics"]["train_loss"]
    assert isinstance(loss, float) and math.isfinite(loss), loss
