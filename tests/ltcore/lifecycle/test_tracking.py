"""Tracking of a finished two-stage run (the end-of-job hook's work), on the embedded store: no Ray."""

from __future__ import annotations

import json

import pytest

from ltcore.config import load_config
from ltcore.lifecycle import tracking

pytestmark = pytest.mark.timeout(300)


def _fake_run(tmp_path) -> str:
    """A run folder as finish_run leaves it: report.json, config.yaml, plots, and the final checkpoint."""
    run = tmp_path / "store" / "runs" / "r1"
    model = run / "stage2" / "checkpoint_000000"
    model.mkdir(parents=True)
    (model / "state.pt").write_bytes(b"w")
    (model / "meta.json").write_text("{}")
    for name in ("config.yaml", "confusion_matrix.png", "recall_vs_count.png"):
        (run / name).write_bytes(b"x")
    test = {"accuracy": 0.8, "balanced_accuracy": 0.6, "few_accuracy": 0.25, "auc_ovr_macro": None,
            "per_class_recall": {"nv": 0.9, "df": 0.3}}
    report = {"run_id": "r1", "run_uri": str(run), "dataset": "/d/manifest.json", "dataset_hash": "abc",
              "model": str(model), "metrics": {"val": dict(test), "test": test}, "timings": {"total_s": 12.5}}
    (run / "report.json").write_text(json.dumps(report))
    return str(run / "report.json")


def test_off_by_default_then_logs_params_metrics_and_artifacts(tmp_path):
    report_uri = _fake_run(tmp_path)
    off = load_config(None, [f"train.storage={tmp_path / 'store'}", "stage1.epochs=3"])
    assert tracking.log_if_enabled(off, report_uri, log=lambda s: None) is None
    assert not (tmp_path / "store" / "mlflow.db").exists()

    on = load_config(None, [f"train.storage={tmp_path / 'store'}", "stage1.epochs=3", "tracking.mlflow_uri=embedded",
                            "storage.s3_secret_key=hunter2"])
    lines: list[str] = []
    rid = tracking.log_if_enabled(on, report_uri, log=lines.append)
    assert rid and lines and rid in lines[0]

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    run = MlflowClient(tracking_uri=uri).get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.params["stage1.epochs"] == "3"
    assert run.data.params["storage.s3_secret_key"] == "<redacted>"  # secrets never reach MLflow
    assert run.data.metrics["test_balanced_accuracy"] == 0.6
    assert run.data.metrics["test_recall_df"] == 0.3
    assert "test_auc_ovr_macro" not in run.data.metrics  # None is not a number
    assert run.data.tags["ltcore.dataset_hash"] == "abc"
    paths = {f.path for f in MlflowClient(tracking_uri=uri).list_artifacts(rid)}
    assert paths >= {"report.json", "config.yaml", "confusion_matrix.png", "checkpoint"}
    assert run.info.artifact_uri.startswith(str(tmp_path / "store" / "mlflow-artifacts"))


def test_training_config_hash_ignores_where_and_how_much():
    base = load_config(None, [])
    same = load_config(None, ["train.storage=/elsewhere", "train.num_workers=8", "tracking.mlflow_uri=embedded",
                              "retrain.tolerance_few_accuracy=0.1", "data.output=/x"])
    other = load_config(None, ["stage1.lr=0.01"])
    assert tracking.training_config_hash(base) == tracking.training_config_hash(same)
    assert tracking.training_config_hash(base) != tracking.training_config_hash(other)
