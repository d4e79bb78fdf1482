"""A study on Ray Tune: Optuna (TPE, seeded), a grid or random search over run-config fields, ASHA on the
per-epoch validation metric, one two-stage job per trial, resumable with the same command.

Layout of ``<storage>/<name>/``: ``study.yaml`` (what was searched, written once), ``tune/`` (Ray Tune's
experiment: what a rerun restores), ``runs/<trial_id>/`` (each trial's run folder: checkpoints, report.json,
plots), ``results.csv`` / ``results.md``, ``best_config.yaml``, ``objective.png`` (``pareto.png``,
``importances.png``), and, for a local study, the MLflow store ``mlflow.db`` + ``mlartifacts/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import yaml
from ray.tune import Callback

from ltcore import storage
from ltcore.config import Config, ConfigError, flatten, to_dict
from ltcore.errors import root_cause
from ltcore.tune import results
from ltcore.tune.config import StudyConfig, scheduler_metric, searches_data, variant_configs
from ltcore.tune.trial import FINAL_KEY, REPLAYED_KEY, REPLAYED_TIME_KEY, trial_dirname

STUDY_FILE = "study.yaml"
TUNE_DIR = "tune"
# The trial function only drives Ray Train (the workers hold the real reservation); a sliver of CPU places it.
TRIAL_CPUS = 0.01
# What a rerun must search the same way to continue a study.
_FIXED_KEYS = ("space", "objectives", "search", "seed", "scheduler")


def study_uri(study: StudyConfig) -> str:
    return storage.join(storage.normalize(study.storage), study.name)


def check_resume(study: StudyConfig, base: Config, uri: str) -> bool:
    """``True`` when the study exists already; then it must have been started with the same search.

    Raises:
        ConfigError: the study folder holds a study with another space, objective or run config.
    """
    from ltcore.engine.runs import config_differences

    path = storage.join(uri, STUDY_FILE)
    if not storage.exists(path):
        return False
    recorded = yaml.safe_load(storage.read_text(path)) or {}
    old, new = flatten(recorded.get("study", {})), flatten(to_dict(study))
    # compared as YAML text: unset bounds are NaN, which never equals itself
    diff = sorted(k for k in old.keys() | new.keys()
                  if k.startswith(_FIXED_KEYS) and yaml.safe_dump(old.get(k)) != yaml.safe_dump(new.get(k)))
    diff += [f"run.{k}" for k in config_differences(recorded.get("run", {}), base)]
    if diff:
        raise ConfigError(f"study {study.name!r} at {uri} was started with another search: "
                          f"{', '.join(diff[:6])} differ; use another name (name=...) or the recorded {path}")
    return True


def search_space(study: StudyConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for s in study.space:
        if s.dist == "uniform":
            space[s.key] = tune.uniform(s.low, s.high)
        elif s.dist == "loguniform":
            space[s.key] = tune.loguniform(s.low, s.high)
        elif s.dist == "int":
            space[s.key] = tune.randint(int(s.low), int(s.high) + 1)  # randint excludes its upper end
        elif s.dist == "choice":
            space[s.key] = tune.choice(list(s.values))
        else:
            space[s.key] = tune.grid_search(list(s.values))
    return space


def tune_config(study: StudyConfig, base: Config) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    metrics = [o.metric for o in study.objectives]
    modes: list[str] = [o.mode for o in study.objectives]
    search_alg: Any = None
    num_samples = study.trials
    if study.search == "optuna":
        if len(metrics) == 1:
            search_alg = OptunaSearch(metric=metrics[0], mode=modes[0], seed=study.seed)
        else:
            search_alg = OptunaSearch(metric=metrics, mode=modes, seed=study.seed)
    elif study.search == "random":
        search_alg = BasicVariantGenerator(random_state=study.seed, max_concurrent=study.concurrency)
    else:
        num_samples = 1  # each grid point once
    scheduler: Any = FIFOScheduler()
    if study.scheduler.kind == "asha":
        metric = scheduler_metric(study)
        mode = next((o.mode for o in study.objectives if o.metric == metric), "max")
        # One Tune step per stage-1 epoch, and one last step with the final metrics.
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=metric, mode=mode,
                                  max_t=base.stage1.epochs + 1, grace_period=study.scheduler.grace_period,
                                  reduction_factor=study.scheduler.reduction_factor)
    return tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                           max_concurrent_trials=study.concurrency, trial_dirname_creator=trial_dirname)


def study_need_cpus(study: StudyConfig, cfg: Config) -> float:
    """CPUs ``concurrency`` trials of run config ``cfg`` hold at once.

    Every trial's training workers hold their CPUs for the whole run, and the ingest's repartition step (small
    splits) runs as tasks of one whole CPU: one whole CPU must stay free beside all the trials' workers, or those
    tasks never start (Ray Data warns "may hang forever", and it does).
    """
    workers = cfg.train.num_workers * cfg.train.cpus_per_worker
    return study.concurrency * (workers + TRIAL_CPUS) + max(1.0, cfg.train.data_cpus)


def check_fits(study: StudyConfig, base: Config, total: float | None = None) -> None:
    """``concurrency`` trials must fit the cluster (``total`` CPUs; default: Ray's count) at once, or the later
    ones would wait for CPUs forever. Searched run config files are checked each."""
    if total is None:
        import ray

        total = float(ray.cluster_resources().get("CPU", 0))
    for name, cfg in {"": base, **variant_configs(study)}.items():
        need = study_need_cpus(study, cfg)
        if need > total + 1e-9:
            raise ConfigError(
                f"{name + ': ' if name else ''}concurrency={study.concurrency} trials x (train.num_workers="
                f"{cfg.train.num_workers} x train.cpus_per_worker={cfg.train.cpus_per_worker:g} + {TRIAL_CPUS:g} "
                f"for the trial) + 1 CPU for the data tasks needs {need:g} CPUs but the cluster has {total:g}; "
                "lower concurrency, run.train.num_workers or run.train.cpus_per_worker")


class Progress(Callback):
    """A Ray Tune callback on the driver: one line per finished trial, with the best so far."""

    def __init__(self, study: StudyConfig, log: Callable[[str], None]) -> None:
        self.objective = study.objectives[0]
        self.log = log
        self.best: tuple[float, str] | None = None

    def _line(self, trial: Any, status: str) -> None:
        r = trial.last_result or {}
        v = r.get(self.objective.metric)
        if status == results.OK and isinstance(v, float) and (
                self.best is None or results._better(self.objective, v, self.best[0])):
            self.best = (v, trial_dirname(trial))
        value = f"{v:.4f}" if isinstance(v, float) else "-"
        at = f" at epoch {int(r.get('epoch', 0)) + 1}" if status == results.STOPPED else ""
        best = f"{self.best[0]:.4f} ({self.best[1]})" if self.best else "-"
        if r.get(REPLAYED_KEY):  # its line was printed before the interruption; say it is kept, not run again
            self.log(f"kept {trial_dirname(trial)} {status} (it had finished before the interruption): "
                     f"{self.objective.metric} {value}; best so far {best}")
            return
        self.log(f"trial {trial_dirname(trial)} {status}{at}: {self.objective.metric} {value}; best so far {best}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, results.OK if (trial.last_result or {}).get(FINAL_KEY) else results.STOPPED)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, results.ERROR)


def one_line(err: BaseException | None) -> str:
    """A trial's error as one line: the innermost error's type and first line (a RunError's own line as is)."""
    if err is None:
        return ""
    root = root_cause(err)
    text = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), "no detail")
    return text[:400] if type(root).__name__ == "RunError" else f"{type(root).__name__}: {text[:400]}"


def rows_from(study: StudyConfig, grid: Any, configs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The table's rows. ``configs`` (trial folder name -> params, from the experiment state) gives the params of
    trials that never reported: a Tune result carries its config only inside its last reported metrics, which a
    restored study does not have for a trial that errored before its first report."""
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        tid = str(res.path).rstrip("/").rsplit("/", 1)[-1]  # named by trial_dirname
        params = res.config or (configs or {}).get(tid) or {}
        row: dict[str, Any] = {"trial": tid, **{s.key: params.get(s.key) for s in study.space}}
        if res.error is not None:
            row["status"], row["error"] = results.ERROR, one_line(res.error)
        else:
            row["status"] = results.OK if m.get(FINAL_KEY) else results.STOPPED
        # The trial's wall time as Tune measured it (or the finished run's, for a replayed result); none for an
        # errored trial, whose time is not kept in the experiment state a resumed study reads.
        secs = m.get(REPLAYED_TIME_KEY, m.get("time_total_s"))
        if isinstance(secs, int | float) and row["status"] != results.ERROR:
            row["minutes"] = float(secs) / 60
        if row["status"] == results.STOPPED and "epoch" in m:
            row["stopped_at_epoch"] = int(m["epoch"]) + 1
        for k in (*results.FINAL_METRICS, *results.TEST_METRICS):
            if isinstance(m.get(k), int | float) and (row["status"] == results.OK or k in m):
                row[k] = float(m[k])
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def run_study(study: StudyConfig, base: Config, *, log: Callable[[str], None] = print,
              start_cluster: Callable[[], None] | None = None) -> str:
    """Run (or resume) the study; returns the URI of ``results.csv``.

    Order: the run config and the study folder are checked before Ray starts; then the shared dataset version
    (prepared once per study unless trials search ``data.*``), the cluster fit, and Tune.
    """
    from ltcore.engine.pipeline import ensure_dataset, validate

    validate(base)
    uri = study_uri(study)
    storage.check_bucket(storage.join(uri, "x"))
    resumed = check_resume(study, base, uri)
    if not resumed:
        storage.check_writable(uri)
    if start_cluster is not None:
        start_cluster()
    check_fits(study, base)
    dataset = "" if searches_data(study, base) else ensure_dataset(base)
    if not resumed:
        storage.write_text(storage.join(uri, STUDY_FILE),
                           yaml.safe_dump({"study": to_dict(study), "run": to_dict(base, redact=True)},
                                          sort_keys=False))
    log(f"study {study.name}: {'resuming' if resumed else 'new'}, {uri}")
    grid, configs = _fit(study, base, uri, dataset, resumed, log)
    return write_outputs(study, base, uri, rows_from(study, grid, configs), log)


def _fit(study: StudyConfig, base: Config, uri: str, dataset: str, resumed: bool,
         log: Callable[[str], None]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Run or restore the Tuner: ``(ResultGrid, trial folder name -> params)``."""
    from ray import tune

    from ltcore.tune.trial import TrialSetup, run_trial

    setup = TrialSetup(base=to_dict(base), study_uri=uri, dataset=dataset, resource_timeout_s=study.resource_timeout_s,
                       variants={name: to_dict(cfg) for name, cfg in variant_configs(study).items()})
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_CPUS})
    callbacks: list[Any] = [Progress(study, log)]
    if study.tracking.mlflow:
        from ltcore.tune.tracking import MlflowTrials, default_tracking_uri

        tracking_uri, artifacts = default_tracking_uri(uri, study.name)
        if study.tracking.mlflow_uri:
            tracking_uri, artifacts = study.tracking.mlflow_uri, None  # type: ignore[assignment]
        callbacks.append(MlflowTrials(tracking_uri, study.name, artifacts, uri))
        log(f"mlflow: {tracking_uri} (experiment {study.name!r}); open it with: mlflow ui --backend-store-uri "
            f"{tracking_uri}")
    fs, path = storage.arrow_fs(uri)
    exp_path = storage.join(path, TUNE_DIR) if storage.is_local(uri) else f"{path.rstrip('/')}/{TUNE_DIR}"
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=path, storage_filesystem=fs, callbacks=callbacks,
                                verbose=0, failure_config=tune.FailureConfig(max_failures=0))
    if resumed and tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        # Finished and errored trials stay as they are; unfinished ones start again and resume their Ray Train
        # checkpoints from their run folders. The Tuner is restored with its searcher and scheduler state.
        # The callbacks come back from the pickled Tuner (MlflowTrials reconnects and finds its runs by tag).
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, param_space=search_space(study), storage_filesystem=fs)
    else:
        tuner = tune.Tuner(trainable, param_space=search_space(study), tune_config=tune_config(study, base),
                           run_config=run_config)
    grid = tuner.fit()
    analysis = tune.ExperimentAnalysis(exp_path, storage_filesystem=fs)
    return grid, {trial_dirname(t): dict(t.config) for t in analysis.trials}


def write_outputs(study: StudyConfig, base: Config, uri: str, rows: list[dict[str, Any]],
                  log: Callable[[str], None]) -> str:
    csv_uri = storage.join(uri, "results.csv")
    storage.write_text(csv_uri, results.to_csv(study, rows))
    md = results.to_markdown(study, rows)
    storage.write_text(storage.join(uri, "results.md"), md)
    log(md)
    results.plot_objective(study, rows, storage.join(uri, "objective.png"))
    if len(study.objectives) == 2 and rows:
        results.plot_pareto(study, rows, storage.join(uri, "pareto.png"))
    imp = results.param_importances(study, rows)
    if imp:
        results.plot_importances(imp, study.objectives[0].metric, storage.join(uri, "importances.png"))
        log("importances: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    best = results.best_row(study, rows)
    if best is not None:
        best_uri = storage.join(uri, "best_config.yaml")
        storage.write_text(best_uri, results.best_config_yaml(study, base, best))
        v = best[study.objectives[0].metric]
        log(f"best: trial {best['trial']} {study.objectives[0].metric} "
            f"{v if not isinstance(v, float) or math.isnan(v) else round(v, 4)}; config: {best_uri}")
    counts = {s: sum(r["status"] == s for r in rows) for s in (results.OK, results.STOPPED, results.ERROR)}
    log(f"trials: {len(rows)} ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    return csv_uri
