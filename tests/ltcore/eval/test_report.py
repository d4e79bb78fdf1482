from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ltcore import storage
from ltcore.eval.report import metrics_table, to_jsonable, write_report


def test_metrics_table_formats_and_dashes_for_none() -> None:
    rows = {
        "val": {"accuracy": 0.9, "balanced_accuracy": 0.75, "macro_f1": 0.7, "many_accuracy": 0.95,
                "medium_accuracy": 0.6, "few_accuracy": None, "auc_ovr_macro": 0.91234},
        "test": {"accuracy": 0.5},
    }
    lines = metrics_table(rows).splitlines()
    assert lines[0].split() == ["acc", "bal_acc", "macro_f1", "many", "medium", "few", "auc"]
    assert lines[2].split() == ["val", "0.9000", "0.7500", "0.7000", "0.9500", "0.6000", "-", "0.9123"]
    assert lines[3].split() == ["test", "0.5000", "-", "-", "-", "-", "-", "-"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_write_report_roundtrip(tmp_path: Path) -> None:
    report = {"metrics": {"accuracy": np.float32(0.5), "few_accuracy": None, "cm": np.array([[1, 0], [0, 2]])},
              "n": np.int64(3), "nan_loss": float("nan")}
    uri = write_report(str(tmp_path / "runs" / "r1"), report)
    assert uri == str(tmp_path / "runs" / "r1" / "report.json")
    back = json.loads(Path(uri).read_text())
    assert back == {"metrics": {"accuracy": 0.5, "few_accuracy": None, "cm": [[1, 0], [0, 2]]}, "n": 3,
                    "nan_loss": None}
    assert [p.name for p in (tmp_path / "runs" / "r1").iterdir()] == ["report.json"]  # no temp file left


def test_write_report_to_memory_uri() -> None:
    uri = write_report("memory://ltcore-test-report/run", {"a": 1})
    assert storage.read_json(uri) == {"a": 1}


def test_unserialisable_value_names_its_key() -> None:
    with pytest.raises(ValueError, match=r"report\.metrics\.bad is a object"):
        to_jsonable({"metrics": {"bad": object()}})
