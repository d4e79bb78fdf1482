"""The run's ``report.json`` and the plain-text metrics table printed at the end of a run."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ltcore import storage

REPORT_NAME = "report.json"

# (column header, metrics key) in print order.
TABLE_COLUMNS = (
    ("acc", "accuracy"),
    ("bal_acc", "balanced_accuracy"),
    ("macro_f1", "macro_f1"),
    ("many", "many_accuracy"),
    ("medium", "medium_accuracy"),
    ("few", "few_accuracy"),
    ("auc", "auc_ovr_macro"),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float, np.number)):
        v = float(value)
        return "-" if math.isnan(v) else f"{v:.4f}"
    return str(value)


def metrics_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table, one row per name (e.g. split or model), of the headline metrics as fractions.

    ``rows`` maps a row name to a :func:`~ltcore.eval.metrics.compute_metrics` dict; missing or null values
    show as ``-`` (e.g. ``few`` under the count rule on HAM10000, where that group is empty).
    """
    header = ["", *[h for h, _ in TABLE_COLUMNS]]
    body = [[str(name), *[_fmt(m.get(key)) for _, key in TABLE_COLUMNS]] for name, m in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *[line(r) for r in body]])


def to_jsonable(obj: Any, where: str = "report") -> Any:
    """Plain JSON values from nested dicts/lists/tuples, numpy scalars and arrays; NaN and inf become null.

    Raises:
        ValueError: a value JSON cannot hold (names its key path).
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None  # strict JSON has no NaN/Infinity
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise ValueError(f"{where} is a {type(obj).__name__}, which JSON cannot hold; convert it to a plain value")


def write_report(run_uri: str, report: Mapping[str, Any]) -> str:
    """Write ``report`` as ``<run_uri>/report.json`` atomically (see :func:`to_jsonable`); returns its URI."""
    uri = storage.join(run_uri, REPORT_NAME)
    storage.write_json(uri, to_jsonable(report))
    return uri
