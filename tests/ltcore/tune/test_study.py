"""Studies end to end through the entry script (each starts its own local Ray with the dashboard on, as users do).

All slow: a study is several Ray Train runs. Each test has a timeout; Ray can hang rather than fail.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "pipelines" / "tune_study.py"
DEMO = REPO / "ltcore" / "configs" / "study_demo.yaml"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    e.pop("RAY_ADDRESS", None)
    return {**e, **(extra or {})}


def study(tmp_path: Path, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--config", str(DEMO), "run.data.output=" + str(tmp_path / "datasets"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def table(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(1800)
def test_study_demo_asha_table_best_config_and_mlflow(tmp_path):
    out = study(tmp_path, f"storage={tmp_path / 'studies'}")
    last = out.stdout.strip().splitlines()[-1]
    folder = tmp_path / "studies" / "demo"
    assert last == f"study: {folder / 'results.csv'}"
    rows = table(folder / "results.csv")
    assert len(rows) == 6 and len({r["trial"] for r in rows}) == 6
    statuses = [r["status"] for r in rows]
    assert "stopped" in statuses, statuses  # ASHA stopped at least one trial early
    assert statuses.count("ok") >= 1 and "error" not in statuses
    for r in rows:
        if r["status"] == "stopped":
            assert 1 <= int(r["stopped_at_epoch"]) < 3
        if r["status"] == "ok":
            assert 0.0 <= float(r["val_balanced_accuracy"]) <= 1.0
    assert sum(ln.startswith("trial ") for ln in out.stdout.splitlines()) == 6  # a line per finished trial
    for name in ("results.md", "objective.png", "best_config.yaml", "study.yaml"):
        assert (folder / name).exists(), name

    # MLflow: one run per trial, with its searched params and per-epoch metrics; finished trials carry report.json
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id])
    by_trial = {r.data.tags["ltcore.trial_id"]: r for r in runs}
    assert set(by_trial) == {r["trial"] for r in rows}
    for r in rows:
        run = by_trial[r["trial"]]
        assert float(run.data.params["stage1.q"]) == pytest.approx(float(r["stage1.q"]))
        history = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
        epochs = int(r["stopped_at_epoch"]) if r["status"] == "stopped" else 3 + 1  # + the final report
        assert len(history) == epochs, (r, [m.step for m in history])
        if r["status"] == "ok":
            assert run.info.status == "FINISHED"
            names = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"report.json", "confusion_matrix.png"} <= names

    # the best config runs as it is with two_stage.py
    best = folder / "best_config.yaml"
    run = subprocess.run([sys.executable, str(REPO / "pipelines" / "two_stage.py"), "--config", str(best),
                          f"train.storage={tmp_path / 'best'}"], capture_output=True, text=True, timeout=900,
                         cwd=tmp_path, env=env())
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(Path(run.stdout.strip().splitlines()[-1].removeprefix("report: ")).read_text())
    best_row = max((r for r in rows if r["status"] == "ok"), key=lambda r: float(r["val_balanced_accuracy"]))
    assert report["config"]["stage1"]["lr"] == pytest.approx(float(best_row["stage1.lr"]))


@pytest.mark.timeout(2400)
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    args = [f"storage={tmp_path / 'studies'}", "name=resume", "trials=4", "tracking.mlflow=false",
            "scheduler.kind=fifo"]
    cmd = [sys.executable, str(SCRIPT), "--config", str(DEMO), "run.data.output=" + str(tmp_path / "datasets"), *args]
    with open(tmp_path / "first.log", "w") as log:
        # its own session: killing the group kills the driver and the local Ray it started, as a crash would
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env(),
                                start_new_session=True)
        deadline = time.monotonic() + 1500
        finished: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            finished = [ln for ln in (tmp_path / "first.log").read_text().splitlines() if ln.startswith("trial ")]
            if finished:
                break
            time.sleep(2)
        assert finished and proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_first = {ln.split()[1] for ln in finished}
    runs = tmp_path / "studies" / "resume" / "runs"
    reports = {t: (runs / t / "report.json").stat().st_mtime_ns for t in done_first}

    out = study(tmp_path, *args, timeout=1500)
    assert "study resume: resuming" in out.stdout
    rerun = {ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("trial ")}
    assert not done_first & rerun, (done_first, rerun)  # finished trials were not run again
    assert {t: (runs / t / "report.json").stat().st_mtime_ns for t in done_first} == reports  # nor rewritten
    rows = table(tmp_path / "studies" / "resume" / "results.csv")
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    assert all(r["status"] == "ok" for r in rows), rows


def total_variation(a: list[float], b: list[float]) -> float:
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b))


@pytest.mark.s3
@pytest.mark.timeout(1800)
def test_study_on_s3_errored_trials_searched_q_and_resume(tmp_path, s3_bucket, s3_server):
    # A grid of four: the cosine head cannot take cRT (a config error only the trial sees: those two trials
    # error); stage1.q 0 (class-balanced) or 1 (instance) must reach each trial's sampler.
    args = [f"storage={s3_bucket}/studies", "name=s3grid", "search=grid", "scheduler.kind=fifo",
            "space=[{key: model.head, dist: grid, values: [linear, cosine]}, "
            "{key: stage1.q, dist: grid, values: [0.0, 1.0]}]",
            "run.stage1.epochs=1", "run.train.max_steps_per_epoch=10"]
    first = study(tmp_path, *args)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    prefix = s3_bucket.removeprefix("s3://") + "/studies/s3grid"
    rows = list(csv.DictReader(fs.cat(prefix + "/results.csv").decode().splitlines()))
    assert sorted((r["model.head"], float(r["stage1.q"])) for r in rows) == [
        ("cosine", 0.0), ("cosine", 1.0), ("linear", 0.0), ("linear", 1.0)]
    for r in rows:
        if r["model.head"] == "cosine":
            assert r["status"] == "error"
            assert "stage2.method=crt needs model.head=linear" in r["error"] and "\n" not in r["error"]
        else:
            assert r["status"] == "ok", r
    assert fs.exists(prefix + "/tune") and fs.exists(prefix + "/best_config.yaml")
    assert first.stdout.strip().splitlines()[-1] == f"study: {s3_bucket}/studies/s3grid/results.csv"

    # The delivered class histogram of each finished trial follows its own q: p_j ~ n_j^q.
    for r in rows:
        if r["status"] != "ok":
            continue
        report = json.loads(fs.cat(f"{prefix}/runs/{r['trial']}/report.json"))
        counts = report["class_counts"]["train"]
        hist = report["stages"]["stage1"]["last_metrics"]["train_class_histogram"]
        delivered = [h / sum(hist) for h in hist]
        expect = {q: [c**q / sum(n**q for n in counts) for c in counts] for q in (0.0, 1.0)}
        q = float(r["stage1.q"])
        other = 1.0 - q
        assert sum(hist) >= 100
        assert total_variation(delivered, expect[q]) < total_variation(delivered, expect[other]), (q, hist, counts)

    again = study(tmp_path, *args)  # the same command: restored from S3, nothing run again
    assert "study s3grid: resuming" in again.stdout
    assert not [ln for ln in again.stdout.splitlines() if ln.startswith("trial ")]
    assert list(csv.DictReader(fs.cat(prefix + "/results.csv").decode().splitlines())) == rows
