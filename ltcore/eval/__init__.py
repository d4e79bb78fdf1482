"""Evaluation: metrics from gathered predictions, report.json, plots."""

from __future__ import annotations

from ltcore.eval.metrics import GROUP_RULES, class_groups, compute_metrics, expected_calibration_error
from ltcore.eval.plots import plot_confusion, plot_recall_vs_count
from ltcore.eval.report import metrics_table, to_jsonable, write_report

__all__ = [
    "GROUP_RULES",
    "class_groups",
    "compute_metrics",
    "expected_calibration_error",
    "metrics_table",
    "plot_confusion",
    "plot_recall_vs_count",
    "to_jsonable",
    "write_report",
]
