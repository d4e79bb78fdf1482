"""One trial: the two-stage job run as Ray Train runs from inside a Ray Tune function trainable.

The trial is the Train driver (Ray's Train-V2-in-Tune pattern): it builds the trial's run config, opens the run
folder ``<study>/runs/<trial_id>/`` (a restarted trial resumes its Ray Train checkpoints there), runs
:func:`ltcore.engine.pipeline.train_stages` with a callback that forwards each stage-1 epoch's metrics to Tune
(what ASHA watches), writes the report and plots, and reports the final stage's validation metrics last.

The final result is also written to the run folder (``final_result.json``) before it is reported. Tune saves its
experiment state only every so often, so a driver killed just after a trial finished restores that trial as
unfinished; the restarted trial then finds its final result there and reports it again at once instead of
training a second time (:data:`REPLAYED_KEY` marks such a report).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from ltcore import logs, storage
from ltcore.config import Config, from_dict
from ltcore.raystart import quiet_ray_loggers
from ltcore.tune.config import EPOCH_METRICS, RUN_CONFIG_KEY, trial_config

# Keys of every per-epoch and final report: Tune and ASHA see one flat dict of numbers per step.
STAGE_KEY, FINAL_KEY, REPORT_KEY = "stage", "final", "report"
# Marks a final result reported again by a trial restarted after it had finished, and carries the first run's
# wall time (Tune's own time_total_s then measures only the replay).
REPLAYED_KEY, REPLAYED_TIME_KEY = "replayed", "replayed_time_s"
FINAL_FILE = "final_result.json"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares, handed to the trainable with ``tune.with_parameters``."""

    base: dict[str, Any]  # the base run config (to_dict, not redacted: the trial process needs the storage keys)
    study_uri: str
    dataset: str  # the study's dataset version, or "" when trials search data settings and prepare their own
    resource_timeout_s: float
    # the searched run config files (``run_config`` in the space), loaded on the driver: name -> to_dict
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


class EpochToTune(TuneReportCallback):
    """Ray Train callback: forwards stage 1's per-epoch numbers to the trial's Tune session (rank 0's report).

    Stage 2 reports once at its end; the trial reports the final metrics itself, so only epoch reports (those
    with an ``epoch`` key) go through here. Lists (the class histogram) stay out: Tune and MLflow take numbers.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = metrics[0] if metrics else {}
        if "epoch" not in first or first.get("resumed"):
            return
        out = {k: float(v) for k, v in first.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        out[STAGE_KEY] = 1
        super().after_report(run_context, [out], None)


def wait_for_cpus(need: float, timeout_s: float) -> None:
    """Wait until the cluster has ``need`` CPUs free, or fail with one line.

    Ray Train waits for its workers' placement group without end; a trial whose resources never come (taken by
    another job, or leaked by a killed trial) would hang the study. This fails the trial instead.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        free = float(ray.available_resources().get("CPU", 0.0))
        if free + 1e-6 >= need:
            return
        if time.monotonic() > deadline:
            total = float(ray.cluster_resources().get("CPU", 0.0))
            raise RuntimeError(f"the trial's training needs {need:g} CPUs but only {free:g} of {total:g} were free "
                               f"for {timeout_s:g} s (resource_timeout_s); lower the study's concurrency or "
                               "train.num_workers / train.cpus_per_worker, or free the cluster")
        time.sleep(1.0)


def trial_dirname(trial: Any) -> str:
    """``trial_<n>_<id>``: Tune's trial folder and the trial's run folder share this name; ``n`` (the order the
    trials were created in) sorts the table, since Tune's trial ids are random."""
    n = str(trial.experiment_tag or "0").split("_", 1)[0]
    return f"trial_{int(n) if n.isdigit() else 0:03d}_{trial.trial_id}"


def trial_run_config(setup: TrialSetup, params: dict[str, Any], trial_id: str) -> Config:
    base = setup.variants[str(params[RUN_CONFIG_KEY])] if RUN_CONFIG_KEY in params else setup.base
    return trial_config(from_dict(base), params, storage=setup.study_uri, run_id=trial_id, dataset=setup.dataset)


def trial_need_cpus(cfg: Config) -> float:
    """What a trial's training workers and data tasks reserve."""
    return cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.train.data_cpus


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The function trainable (``tune.with_parameters(run_trial, setup=...)``)."""
    from ltcore.engine import runs
    from ltcore.engine.pipeline import finish_run, open_checked_run, train_stages

    ctx = ray.data.DataContext.get_current()  # many trials' bars and per-execution lines would interleave
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    quiet_ray_loggers(logs.ray_log_level())
    trial_id = os.path.basename(ray.tune.get_context().get_trial_dir().rstrip("/"))  # trial_dirname
    cfg = trial_run_config(setup, params, trial_id)
    storage.set_default_s3(storage.S3Options(cfg.storage.s3_endpoint_url, cfg.storage.s3_access_key,
                                             cfg.storage.s3_secret_key, cfg.storage.s3_region))
    final_uri = storage.join(setup.study_uri, "runs", trial_id, FINAL_FILE)
    if storage.exists(final_uri):  # finished before the driver died: report the same result, train nothing
        done = storage.read_json(final_uri)
        ray.tune.report({**done["result"], REPLAYED_KEY: 1, REPLAYED_TIME_KEY: float(done["time_s"])})
        return
    t0 = time.perf_counter()
    run, manifest_uri, manifest = open_checked_run(cfg, log=lambda *_: None)
    runs.record_run(run, cfg, manifest_uri, manifest.hash)
    wait_for_cpus(trial_need_cpus(cfg), setup.resource_timeout_s)
    stages, timings = train_stages(cfg, run, manifest_uri, manifest, callbacks=[EpochToTune()])
    timings["total_s"] = time.perf_counter() - t0
    uri, _table = finish_run(cfg, run, manifest_uri, manifest, stages, timings)
    final = stages["stage2" if "stage2" in stages else "stage1"]
    out: dict[str, Any] = {STAGE_KEY: 2 if "stage2" in stages else 1, FINAL_KEY: 1,
                           "epoch": float(cfg.stage1.epochs - 1)}
    for split in ("val", "test"):
        out.update({f"{split}_{k}": float(v) for k, v in final[split].items()
                    if isinstance(v, int | float) and not isinstance(v, bool)})
    out[REPORT_KEY] = uri
    storage.write_json(final_uri, {"result": out, "time_s": time.perf_counter() - t0})
    ray.tune.report(out)


__all__ = ["EPOCH_METRICS", "EpochToTune", "TrialSetup", "run_trial", "wait_for_cpus"]
