"""The study's outputs from result rows: table, best trial, Pareto front, best config YAML, importances, plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import yaml

from ltcore.config import load_config
from ltcore.tune import results
from ltcore.tune.config import load_study

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "ltcore" / "configs" / "study_demo.yaml"


def rows() -> list[dict]:
    def r(i, lr, q, status, bal, few, **kw):
        return {"trial": f"t_{i:05d}", "stage1.lr": lr, "stage1.q": q, "stage1.loss.label_smoothing": 0.0,
                "status": status, "val_balanced_accuracy": bal, "val_few_accuracy": few, **kw}
    return [r(0, 0.1, 0.5, "ok", 0.60, 0.20), r(1, 0.01, 0.0, "ok", 0.70, 0.10),
            r(2, 0.001, 1.0, "stopped", 0.30, 0.0, stopped_at_epoch=1), r(3, 0.05, 0.2, "ok", 0.65, 0.40),
            r(4, 0.2, 0.9, "error", None, None, error="RunError: run t_00004 failed in stage 1: boom")]


def test_table_has_every_trial_once_with_status_and_reason():
    study, _ = load_study(str(DEMO))
    table = list(csv.DictReader(io.StringIO(results.to_csv(study, rows()))))
    assert [t["trial"] for t in table] == [f"t_{i:05d}" for i in range(5)]
    assert [t["status"] for t in table] == ["ok", "ok", "stopped", "ok", "error"]
    assert table[2]["stopped_at_epoch"] == "1" and table[4]["error"].startswith("RunError: run t_00004")
    md = results.to_markdown(study, rows())
    assert md.count("\n") == 2 + 5 and "| t_00002 |" in md


def test_best_and_pareto():
    study, _ = load_study(str(DEMO))
    assert results.best_row(study, rows())["trial"] == "t_00001"  # 0.70 is the best finished balanced accuracy
    two = load_study(str(DEMO), ["objectives=[{metric: val_balanced_accuracy}, {metric: val_few_accuracy}]"])[0]
    # t0 (0.60, 0.20) is beaten on both by t3 (0.65, 0.40); t1 and t3 trade off: the front
    assert sorted(r["trial"] for r in results.pareto_rows(two, rows())) == ["t_00001", "t_00003"]


def test_best_config_is_a_runnable_run_config(tmp_path):
    study, base = load_study(str(DEMO))
    text = results.best_config_yaml(study, base, results.best_row(study, rows()))
    path = tmp_path / "best.yaml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert (cfg.stage1.lr, cfg.stage1.q, cfg.train.run_id) == (0.01, 0.0, "")
    assert cfg.stage1.epochs == base.stage1.epochs and yaml.safe_load(text)["stage1"]["lr"] == 0.01


def test_importances_and_plots(tmp_path):
    study, _ = load_study(str(DEMO))
    imp = results.param_importances(study, rows())
    assert imp is not None and set(imp) == {"stage1.lr", "stage1.q"}  # label smoothing never varied
    assert abs(sum(imp.values()) - 1.0) < 1e-6
    for name, fn in (("o.png", lambda u: results.plot_objective(study, rows(), u)),
                     ("i.png", lambda u: results.plot_importances(imp, "val_balanced_accuracy", u))):
        fn(str(tmp_path / name))
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert results.param_importances(study, rows()[:1]) is None  # one finished trial: nothing to compare
