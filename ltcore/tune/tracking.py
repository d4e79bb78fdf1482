"""MLflow tracking of a study: one MLflow run per trial (params, per-epoch metrics, report.json and plots).

A Ray Tune callback on the study's driver, written with the MLflow client rather than Ray's
``MLflowLoggerCallback``: a resumed study must continue each trial's MLflow run instead of opening a second one
(the run is found again by its ``ltcore.trial_id`` tag), and the artifacts are the trial's own report and plots
from its run folder, not Tune's trial folder.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ray.tune import Callback

from ltcore import storage
from ltcore.tune.trial import REPLAYED_KEY, trial_dirname

TRIAL_TAG = "ltcore.trial_id"
ARTIFACTS = ("report.json", "confusion_matrix.png", "recall_vs_count.png")


def default_tracking_uri(study_uri: str, name: str) -> tuple[str, str]:
    """``(tracking URI, artifact location)``: a SQLite store and an artifact folder beside a local study; for a
    study on object storage (SQLite needs a local file) under ``./ltcore-runs/mlflow/<name>/``."""
    if storage.is_local(study_uri):
        root = storage.local_path(study_uri)
    else:
        root = os.path.abspath(os.path.join("ltcore-runs", "mlflow", name))
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}", os.path.join(root, "mlartifacts")


class MlflowTrials(Callback):
    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None, study_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.study_uri = study_uri
        self._client: Any = None
        self._experiment_id = ""
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment (a restored study gets them back): no client inside.
        return {**self.__dict__, "_client": None, "_runs": {}}

    def _setup(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            self._experiment_id = exp.experiment_id if exp is not None else self._client.create_experiment(
                self.experiment, artifact_location=self.artifact_location)
        return self._client

    def _run_id(self, trial: Any) -> str:
        tid = trial_dirname(trial)
        if tid not in self._runs:
            client = self._setup()
            found = client.search_runs([self._experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{tid}'",
                                       max_results=1)
            if found:
                run_id = found[0].info.run_id  # a resumed study continues the trial's run
                client.update_run(run_id, status="RUNNING")
            else:
                run = client.create_run(self._experiment_id, run_name=str(trial), tags={TRIAL_TAG: tid})
                run_id = run.info.run_id
                for k, v in (trial.config or {}).items():
                    client.log_param(run_id, k, v)
            self._runs[tid] = run_id
        return self._runs[tid]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        import time

        from mlflow.entities import Metric

        run_id = self._run_id(trial)
        if result.get(REPLAYED_KEY):  # a finished trial's result reported again after a resume: logged already
            return
        step = int(result.get("training_iteration", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and not k.startswith(("time_", "pid"))]
        self._setup().log_batch(run_id, metrics=metrics)

    def _end(self, trial: Any, status: str) -> None:
        run_id = self._run_id(trial)
        client = self._setup()
        run_uri = storage.join(self.study_uri, "runs", trial_dirname(trial))
        with tempfile.TemporaryDirectory() as tmp:
            for name in ARTIFACTS:
                src = storage.join(run_uri, name)
                if storage.exists(src):
                    local = os.path.join(tmp, name)
                    fs, path = storage.fsspec_fs(src)
                    fs.get(path, local)
                    client.log_artifact(run_id, local)
        client.set_terminated(run_id, status=status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")
