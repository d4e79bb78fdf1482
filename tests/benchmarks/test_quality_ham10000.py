"""benchmarks/quality_ham10000.py is a grid study over the method configs: its study, its rows, its bad input."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

from ltcore.tune.config import check_study, variant_configs
from ltcore.tune.results import to_csv

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "quality_ham10000.py"


def _module():
    spec = importlib.util.spec_from_file_location("quality_ham10000", SCRIPT)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(configs=str(REPO / "ltcore" / "configs"), backbone="tf_efficientnet_lite0",
                              image_size=128, epochs=2, storage=str(tmp_path), no_mlflow=True)


def test_every_row_of_the_table_is_a_trial_of_its_method_config(tmp_path):
    q = _module()
    methods = [m for m in q.ORDER if not m.startswith("ce + ")]
    files = q.row_files(methods, ["crt", "tau_norm", "lws"])
    assert set(files) == set(q.ORDER)
    study = q.quality_study(_args(tmp_path), files, ["stage1.epochs=2", "train.cpus_per_worker=0.9"])
    configs = variant_configs(study)  # every shipped method config loads, with the common overrides
    check_study(study, next(iter(configs.values())))
    assert study.search == "grid" and study.concurrency == 1 and study.scheduler.kind == "fifo"
    assert configs[files["ce + lws"]].stage2.method == "lws" and configs[files["lmd"]].stage1.method == "lmd_rrl"
    assert {c.stage1.epochs for c in configs.values()} == {2}
    assert len({(c.data, c.dataset) for c in configs.values()}) == 1  # one dataset version for every row
    other = q.quality_study(_args(tmp_path), files, ["stage1.epochs=3"])
    assert other.name != study.name  # another protocol is another study, not a refused resume
    on_version = q.quality_study(_args(tmp_path), files, ["stage1.epochs=2", "train.cpus_per_worker=0.9"],
                                 dataset="/data/v1/manifest.json")
    assert on_version.name == study.name  # the version follows from the protocol's data settings
    assert {c.dataset for c in variant_configs(on_version).values()} == {"/data/v1/manifest.json"}


def test_study_rows_become_table_rows(tmp_path):
    q = _module()
    files = q.row_files(["ce", "focal"], ["crt"])
    study = q.quality_study(_args(tmp_path), files, [])
    rows = [
        {"trial": "trial_000_a", "run_config": files["ce"], "status": "ok", "test_accuracy": 0.8,
         "test_balanced_accuracy": 0.5, "val_balanced_accuracy": 0.45, "minutes": 12.5},
        {"trial": "trial_001_b", "run_config": files["focal"], "status": "error", "error": "ValueError: boom"},
        {"trial": "trial_002_c", "run_config": files["ce + crt"], "status": "ok", "test_balanced_accuracy": 0.61,
         "minutes": 14.0},
    ]
    out = q.study_rows(to_csv(study, rows), files)
    assert set(out) == {"ce", "ce + crt"}  # the errored trial is reported, not tabled
    assert out["ce"]["test"] == {"accuracy": 0.8, "balanced_accuracy": 0.5} and out["ce"]["minutes"] == 12.5
    assert out["ce + crt"]["test"]["balanced_accuracy"] == 0.61
    assert "| ce + crt | - | 0.610 |" in q.table(out)


def test_a_missing_method_config_is_one_line_before_ray(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--methods", "ce,nope", "--calibrators", "",
                          "--storage", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: space run_config value 'ham10000_nope.yaml'"), lines
    assert not (tmp_path / "studies").exists()
