"""Study files: parsing, the checks that make bad input one line before Ray starts, trial configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ltcore.config import ConfigError, to_dict
from ltcore.tune.config import load_study, searches_data, trial_config, variant_configs

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "ltcore" / "configs" / "study_demo.yaml"


def write(tmp_path: Path, text: str) -> str:
    (tmp_path / "run.yaml").write_text("stage1: {epochs: 3}\ntrain: {num_workers: 1}\n")
    p = tmp_path / "study.yaml"
    p.write_text("run_config: run.yaml\n" + text)
    return str(p)


def test_demo_study_loads():
    study, base = load_study(str(DEMO))
    assert study.trials == 6 and study.concurrency == 2 and study.scheduler.kind == "asha"
    assert [s.key for s in study.space] == ["stage1.lr", "stage1.q", "stage1.loss.label_smoothing"]
    assert base.stage1.epochs == 3 and base.train.num_workers == 1  # run_overrides applied to demo.yaml
    assert not searches_data(study)


def test_ham10000_study_loads_and_its_trials_are_valid_run_configs():
    study, base = load_study(str(REPO / "ltcore" / "configs" / "study_ham10000.yaml"))
    assert study.trials == 8 and study.concurrency == 1 and study.scheduler.kind == "asha"
    assert [s.key for s in study.space] == ["stage1.loss.la_tau", "stage1.q"]
    assert base.stage1.method == "logit_adjusted" and base.stage1.epochs == 2 and base.train.torch_threads == 2
    cfg = trial_config(base, {"stage1.loss.la_tau": 0.5, "stage1.q": 0.25}, storage="/tmp/study", run_id="t0")
    assert cfg.stage1.loss.la_tau == 0.5 and cfg.stage1.q == 0.25


def test_shipped_studies_fit_two_cores_and_an_oversized_one_is_refused():
    from ltcore.tune.study import check_fits

    for name in ("study_demo.yaml", "study_ham10000.yaml"):
        check_fits(*load_study(str(REPO / "ltcore" / "configs" / name)), total=2.0)
    study, base = load_study(str(REPO / "ltcore" / "configs" / "study_ham10000.yaml"), ["run.train.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match=r"needs 2\.01 CPUs but the cluster has 2"):
        check_fits(study, base, total=2.0)


def test_a_study_searches_run_config_files(tmp_path):
    """``run_config`` in the space: each trial starts from its own file (with run_overrides and run.* applied)."""
    from ltcore.tune.results import best_config_yaml
    from ltcore.tune.study import check_fits
    from ltcore.tune.trial import TrialSetup, trial_run_config

    cfgs = tmp_path / "cfgs"
    cfgs.mkdir()
    (cfgs / "common.yaml").write_text("stage1: {epochs: 9, lr: 0.05}\ntrain: {num_workers: 1, cpus_per_worker: 0.5}\n")
    (cfgs / "a.yaml").write_text("base: common.yaml\nstage1: {method: focal}\n")
    (cfgs / "b.yaml").write_text("base: common.yaml\nstage1: {method: ce}\nstage2: {method: crt}\n")
    (cfgs / "c.yaml").write_text("base: common.yaml\ndata: {image_size: 48}\n")
    study_file = cfgs / "study.yaml"
    study_file.write_text("run_overrides: [stage1.epochs=2]\nsearch: grid\nconcurrency: 1\nspace:\n"
                          "  - {key: run_config, dist: grid, values: [a.yaml, b.yaml]}\n"
                          "  - {key: stage1.q, dist: grid, values: [0.0, 0.5]}\n")
    study, base = load_study(str(study_file), ["run.stage1.lr=0.01"])
    assert base.stage1.method == "focal"  # no run_config field: the first searched file is the base
    setup = TrialSetup(base={}, study_uri=str(tmp_path / "s"), dataset="", resource_timeout_s=1.0,
                       variants={k: to_dict(v) for k, v in variant_configs(study).items()})
    cfg = trial_run_config(setup, {"run_config": "b.yaml", "stage1.q": 0.5}, "trial_001_x")
    assert (cfg.stage1.method, cfg.stage2.method, cfg.stage1.q) == ("ce", "crt", 0.5)
    assert (cfg.stage1.epochs, cfg.stage1.lr) == (2, 0.01)  # the study's run_overrides, then run.* overrides
    assert cfg.train.run_id == "trial_001_x"
    best = best_config_yaml(study, base, {"trial": "trial_001_x", "run_config": "b.yaml", "stage1.q": 0.5,
                                          "val_balanced_accuracy": 0.5})
    assert "method: crt" in best and "epochs: 2" in best
    assert not searches_data(study, base)
    check_fits(study, base, total=2.0)
    # a searched file with another dataset: each trial prepares its own
    other, other_base = load_study(str(study_file), ["space=[{key: run_config, dist: grid, values: [a.yaml, c.yaml]}]"])
    assert searches_data(other, other_base)


@pytest.mark.parametrize(("values", "message"), [
    ("[a.yaml, nope.yaml]", "space run_config value 'nope.yaml': config file"),
    ("[]", "run config files with dist grid or choice and a non-empty 'values'"),
])
def test_a_bad_searched_run_config_is_one_line(tmp_path, values, message):
    (tmp_path / "a.yaml").write_text("stage1: {epochs: 1}\n")
    path = tmp_path / "study.yaml"
    path.write_text(f"search: grid\nspace: [{{key: run_config, dist: grid, values: {values}}}]\n")
    with pytest.raises(ConfigError, match=message) as e:
        load_study(str(path))
    assert "\n" not in str(e.value)


def test_run_prefixed_overrides_go_to_the_run_config(tmp_path):
    path = write(tmp_path, "space: [{key: stage1.q, dist: uniform, low: 0, high: 1}]\n")
    study, base = load_study(path, ["trials=3", "run.stage1.epochs=5"])
    assert study.trials == 3 and base.stage1.epochs == 5


@pytest.mark.parametrize(("space", "message"), [
    ("[]", "space is empty"),
    ("[{key: stage1.nope, dist: uniform, low: 0, high: 1}]", "unknown config key 'stage1.nope'"),
    ("[{key: stage1.q, dist: uniform, low: 1, high: 0}]", "needs low < high"),
    ("[{key: stage1.lr, dist: loguniform, low: 0, high: 1}]", "loguniform needs low > 0"),
    ("[{key: stage1.q, dist: normal, low: 0, high: 1}]", "'normal' is not valid"),
    ("[{key: stage1.epochs, dist: int, low: 1.5, high: 3}]", "whole-number"),
    ("[{key: stage1.method, dist: choice, values: []}]", "non-empty 'values'"),
    ("[{key: stage1.epochs, dist: choice, values: [2, x]}]", "expected an integer"),
    ("[{key: model.head, dist: choice, values: [linear, round]}]", "'round' is not valid"),
    ("[{key: train.run_id, dist: choice, values: [a]}]", "set by the study"),
])
def test_bad_space_is_one_line(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_study(write(tmp_path, f"space: {space}\n"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("extra", "message"), [
    ("objectives: [{metric: test_balanced_accuracy}]", "never an objective"),
    ("objectives: [{metric: val_nope}]", "unknown metric"),
    ("objectives: [{metric: val_few_accuracy}]", "ASHA needs one of"),  # not reported per epoch
    ("search: grid", "every space entry to be dist: grid"),
    ("unknown_field: 1", "unknown config key 'unknown_field'"),
    ("trials: many", "expected an integer"),
])
def test_bad_study_fields(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write(tmp_path, "space: [{key: stage1.q, dist: uniform, low: 0, high: 1}]\n" + extra + "\n"))


def test_two_objectives_with_fifo_and_grid(tmp_path):
    study, _ = load_study(write(tmp_path, (
        "space: [{key: stage1.q, dist: grid, values: [0, 0.5, 1]}, {key: data.imbalance_factor, dist: grid, "
        "values: [10, 50]}]\nsearch: grid\nscheduler: {kind: fifo}\n"
        "objectives: [{metric: val_balanced_accuracy}, {metric: val_few_accuracy}]\n")))
    assert len(study.objectives) == 2 and searches_data(study)


def test_trial_config_applies_params_and_run_folder(tmp_path):
    _study, base = load_study(str(DEMO))
    cfg = trial_config(base, {"stage1.lr": 0.01, "stage1.q": 0.25, "stage1.loss.label_smoothing": 0.1},
                       storage=str(tmp_path), run_id="abc_00001", dataset="/x/manifest.json")
    assert (cfg.stage1.lr, cfg.stage1.q, cfg.stage1.loss.label_smoothing) == (0.01, 0.25, 0.1)
    assert (cfg.train.storage, cfg.train.run_id, cfg.dataset) == (str(tmp_path), "abc_00001", "/x/manifest.json")


@pytest.mark.timeout(120)
def test_entry_script_bad_input_is_one_line_before_ray(tmp_path):
    bad = write(tmp_path, "space: [{key: stage1.q, dist: uniform, low: 2, high: 1}]\n")
    out = subprocess.run([sys.executable, str(REPO / "pipelines" / "tune_study.py"), "--config", bad],
                         capture_output=True, text=True, timeout=110, cwd=tmp_path,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines == ["error: space stage1.q: dist uniform needs low < high (got low=2.0, high=1.0)"], out.stderr
    assert "Ray" not in out.stdout + out.stderr and not (tmp_path / "ltcore-runs").exists()
