"""The retrain gate: promote a challenger only if it is no worse than the champion overall and on the tail.

    promote  <=>  bacc(challenger) >= bacc(champion) - tol_bacc   and   few(challenger) >= few(champion) - tol_few

on the same frozen test split, where ``bacc`` is balanced accuracy (mean per-class recall) and ``few`` the accuracy
on the few-shot classes (``ltcore.eval.metrics``' groups, from the training counts). The first model (no champion)
is promoted. A few-shot accuracy that is undefined (NaN: no few-shot class in the test split) on either side is not
compared, and the decision says so. Pure: no MLflow, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

GATE_KEYS = ("balanced_accuracy", "few_accuracy")


@dataclass(frozen=True)
class Decision:
    outcome: Literal["promoted", "kept"]
    reason: str
    challenger: dict[str, float]
    champion: dict[str, float] | None
    tolerances: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(m: Mapping[str, Any], key: str) -> float:
    v = m.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def decide(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, *, tol_balanced_accuracy: float = 0.0,
           tol_few_accuracy: float = 0.0) -> Decision:
    """The gate's decision for test metrics ``challenger`` vs ``champion`` (None: there is no champion yet).

    >>> decide({"balanced_accuracy": 0.50, "few_accuracy": 0.30}, {"balanced_accuracy": 0.52, "few_accuracy": 0.30},
    ...        tol_balanced_accuracy=0.01).outcome   # 0.50 < 0.52 - 0.01
    'kept'

    Raises:
        ValueError: a negative tolerance, or a challenger without balanced accuracy.
    """
    if tol_balanced_accuracy < 0 or tol_few_accuracy < 0:
        raise ValueError(f"gate tolerances must be >= 0, got {tol_balanced_accuracy}, {tol_few_accuracy}")
    tol = {"balanced_accuracy": float(tol_balanced_accuracy), "few_accuracy": float(tol_few_accuracy)}
    ch = {k: _num(challenger, k) for k in GATE_KEYS}
    if math.isnan(ch["balanced_accuracy"]):
        raise ValueError("the challenger has no test balanced accuracy")
    if champion is None:
        return Decision("promoted", "first model: there is no champion", ch, None, tol)
    cp = {k: _num(champion, k) for k in GATE_KEYS}
    failed, notes = [], []
    for k in GATE_KEYS:
        if math.isnan(ch[k]) or math.isnan(cp[k]):
            notes.append(f"{k} not compared (undefined)")
            continue
        floor = cp[k] - tol[k]
        # a hair of float slack: the same model evaluated twice must pass
        if ch[k] < floor - 1e-12:
            failed.append(f"{k} {ch[k]:.4f} < champion {cp[k]:.4f} - {tol[k]:g}")
        else:
            notes.append(f"{k} {ch[k]:.4f} >= champion {cp[k]:.4f} - {tol[k]:g}")
    if failed:
        return Decision("kept", "; ".join(failed + notes), ch, cp, tol)
    return Decision("promoted", "; ".join(notes), ch, cp, tol)
