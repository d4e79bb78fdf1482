"""The study folder without running trials: resume checks, trial folder names, error lines, resource fit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ltcore.config import ConfigError, to_dict
from ltcore.engine.runs import RunError
from ltcore.tune.config import load_study
from ltcore.tune.study import STUDY_FILE, check_resume, one_line, study_uri
from ltcore.tune.trial import trial_dirname

REPO = Path(__file__).resolve().parents[3]
DEMO = str(REPO / "ltcore" / "configs" / "study_demo.yaml")


def record(tmp_path: Path, overrides: list[str]) -> tuple:
    study, base = load_study(DEMO, [f"storage={tmp_path}", *overrides])
    uri = study_uri(study)
    Path(uri).mkdir(parents=True)
    Path(uri, STUDY_FILE).write_text(yaml.safe_dump({"study": to_dict(study), "run": to_dict(base, redact=True)},
                                                    sort_keys=False))
    return study, base, uri


def test_resume_needs_the_same_search(tmp_path):
    study, base, uri = record(tmp_path, [])
    assert check_resume(study, base, uri)  # NaN bounds of choice entries compare equal through YAML
    more, base2 = load_study(DEMO, [f"storage={tmp_path}", "trials=9", "concurrency=1"])
    assert check_resume(more, base2, uri)  # how many trials and how many at once may change
    other, base3 = load_study(DEMO, [f"storage={tmp_path}", "seed=1", "run.stage1.epochs=5"])
    with pytest.raises(ConfigError, match=r"seed.*run\.stage1\.epochs"):
        check_resume(other, base3, uri)


def test_new_study_is_not_a_resume(tmp_path):
    study, base = load_study(DEMO, [f"storage={tmp_path}"])
    assert not check_resume(study, base, study_uri(study))


def test_trial_dirname_orders_by_creation():
    names = [trial_dirname(SimpleNamespace(experiment_tag=f"{n}_stage1.lr=0.1", trial_id=tid))
             for n, tid in ((10, "0a"), (2, "ff"))]
    assert names == ["trial_010_0a", "trial_002_ff"] and sorted(names)[0] == "trial_002_ff"


def test_one_line_takes_the_innermost_error():
    inner = ConfigError("stage2.method=crt needs model.head=linear (got 'cosine')")
    try:
        try:
            raise inner
        except ConfigError as e:
            raise RuntimeError("Ray wrapper\nwith a traceback") from e
    except RuntimeError as outer:
        assert one_line(outer) == "ConfigError: stage2.method=crt needs model.head=linear (got 'cosine')"
    assert one_line(RunError("run x failed in stage 1: ValueError: y; traceback in z")).startswith("run x failed")


def test_a_restarted_finished_trial_reports_its_result_again_without_training(tmp_path, monkeypatch):
    # Tune restores a trial that finished just before the driver died as unfinished and starts it again: the
    # trial must find its final result in its run folder and report it at once, not train a second time.
    import ray.tune

    from ltcore.engine import pipeline
    from ltcore.tune import trial as trial_mod
    from ltcore.tune.study import Progress, rows_from

    study, base = load_study(DEMO, [f"storage={tmp_path}"])
    uri = study_uri(study)
    tid = "trial_002_ab12"
    result = {"stage": 2, "final": 1, "epoch": 1.0, "val_balanced_accuracy": 0.625, "report": "r.json"}
    Path(uri, "runs", tid).mkdir(parents=True)
    Path(uri, "runs", tid, trial_mod.FINAL_FILE).write_text(json.dumps({"result": result, "time_s": 90.0}))
    reported: list[dict] = []
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_dir=lambda: f"/t/{tid}/"))
    monkeypatch.setattr(ray.tune, "report", reported.append)

    def no_training(*a, **k):
        raise AssertionError("a finished trial trained again")

    monkeypatch.setattr(pipeline, "open_checked_run", no_training)
    monkeypatch.setattr(pipeline, "train_stages", no_training)
    setup = trial_mod.TrialSetup(base=to_dict(base), study_uri=uri, dataset="", resource_timeout_s=1.0)
    trial_mod.run_trial({}, setup)
    assert reported == [{**result, trial_mod.REPLAYED_KEY: 1, trial_mod.REPLAYED_TIME_KEY: 90.0}]

    # The driver says it kept the trial (no second "trial ..." line), and the table keeps the first run's time.
    lines: list[str] = []
    t = SimpleNamespace(experiment_tag="2_x", trial_id="ab12", last_result=reported[0])
    Progress(study, lines.append).on_trial_complete(0, [], t)
    assert len(lines) == 1 and lines[0].startswith(f"kept {tid} ok") and "0.6250" in lines[0], lines
    grid = [SimpleNamespace(metrics={**reported[0], "time_total_s": 2.0}, path=f"/x/tune/{tid}", config={},
                            error=None)]
    (row,) = rows_from(study, grid)
    assert row["status"] == "ok" and row["minutes"] == 1.5 and row["val_balanced_accuracy"] == 0.625


def test_restored_errored_trial_keeps_its_params_from_the_experiment_state(tmp_path):
    # A restored study's result for a trial that errored before reporting has no config (Tune keeps a result's
    # config inside its last metrics): the params come from the experiment state's trials instead.
    from ltcore.tune.study import rows_from

    study, _ = load_study(DEMO, [f"storage={tmp_path}"])
    key = study.space[0].key
    err = SimpleNamespace(metrics={"trial_id": "cd34"}, config=None, path="s3://b/s/tune/trial_003_cd34",
                          error=RuntimeError("boom"))
    (row,) = rows_from(study, [err], {"trial_003_cd34": {key: 0.5}, "trial_004_ef56": {key: 0.7}})
    assert row[key] == 0.5 and row["status"] == "error" and row["error"] == "RuntimeError: boom"
    assert "minutes" not in row
