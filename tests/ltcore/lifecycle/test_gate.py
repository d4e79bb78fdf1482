"""The retrain gate's rule on literal numbers."""

from __future__ import annotations

import math

import pytest

from ltcore.lifecycle.gate import decide


def m(bacc: float, few: float) -> dict[str, float]:
    return {"balanced_accuracy": bacc, "few_accuracy": few}


def test_first_model_is_promoted():
    d = decide(m(0.1, 0.0), None)
    assert d.outcome == "promoted" and d.champion is None and "first model" in d.reason


@pytest.mark.parametrize(("challenger", "champion", "tol", "outcome"), [
    (m(0.60, 0.40), m(0.60, 0.40), (0.0, 0.0), "promoted"),  # equal: no worse
    (m(0.59, 0.40), m(0.60, 0.40), (0.0, 0.0), "kept"),  # 0.59 < 0.60 - 0
    (m(0.59, 0.40), m(0.60, 0.40), (0.02, 0.0), "promoted"),  # 0.59 >= 0.60 - 0.02 = 0.58
    (m(0.57, 0.40), m(0.60, 0.40), (0.02, 0.0), "kept"),  # 0.57 < 0.58
    (m(0.70, 0.30), m(0.60, 0.40), (0.02, 0.05), "kept"),  # better overall, but few 0.30 < 0.40 - 0.05 = 0.35
    (m(0.70, 0.36), m(0.60, 0.40), (0.02, 0.05), "promoted"),  # few 0.36 >= 0.35
])
def test_rule(challenger, champion, tol, outcome):
    d = decide(challenger, champion, tol_balanced_accuracy=tol[0], tol_few_accuracy=tol[1])
    assert d.outcome == outcome, d.reason
    assert d.challenger == challenger and d.champion == champion


def test_kept_reason_names_the_failing_metric_with_numbers():
    d = decide(m(0.70, 0.30), m(0.60, 0.40), tol_few_accuracy=0.05)
    assert "few_accuracy 0.3000 < champion 0.4000 - 0.05" in d.reason
    assert d.to_dict()["tolerances"] == {"balanced_accuracy": 0.0, "few_accuracy": 0.05}


def test_undefined_few_shot_accuracy_is_not_compared():
    d = decide(m(0.6, math.nan), m(0.6, 0.5))
    assert d.outcome == "promoted" and "few_accuracy not compared" in d.reason


def test_bad_input():
    with pytest.raises(ValueError, match="tolerances"):
        decide(m(0.5, 0.5), None, tol_balanced_accuracy=-0.1)
    with pytest.raises(ValueError, match="balanced accuracy"):
        decide({"few_accuracy": 0.5}, None)
