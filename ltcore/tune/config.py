"""The study file: which run config, which fields to search and how, what to optimise, how many trials, where.

    run_config: demo.yaml               # the two_stage.py config each trial starts from (relative to this file)
    run_overrides: [stage1.epochs=4]    # key=value overrides applied to it before the searched values
    space:
      - {key: stage1.lr, dist: loguniform, low: 0.001, high: 0.3}
      - {key: stage1.q, dist: uniform, low: 0.0, high: 1.0}
      - {key: stage1.loss.label_smoothing, dist: choice, values: [0.0, 0.1]}
    objectives: [{metric: val_balanced_accuracy, mode: max}]

The space may also search whole run configs: ``{key: run_config, dist: grid, values: [ham10000_ce.yaml,
ham10000_focal.yaml]}`` gives each trial the named file (relative to ``run_config_dir``, by default the study
file's folder) with ``run_overrides`` applied, then the other searched values: a method comparison is a grid
study (``benchmarks/quality_ham10000.py``). The files are read on the driver; trials get the loaded configs.

Loaded with the same typed loader as run configs (``ltcore.config``): an unknown field or a value of the wrong
type is a one-line :class:`ConfigError`; :func:`check_study` adds the checks that need the run config (every
searched key exists there and takes the distribution's values). Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
from dataclasses import dataclass, field
from typing import Literal

from ltcore.config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "grid")
# Per-epoch validation metrics of stage 1 (``ltcore.engine.loops.VAL_KEYS``): what early stopping can watch.
EPOCH_METRICS = ("val_accuracy", "val_balanced_accuracy", "val_macro_f1")
# Final metrics a trial reports (validation split of the final stage); the test split is never an objective.
FINAL_METRICS = ("val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_auc_ovr_macro", "val_many_accuracy",
                 "val_medium_accuracy", "val_few_accuracy", "val_ece")
Scalar = bool | int | float | str


@dataclass(frozen=True)
class ParamSpec:
    """One searched field: ``key`` dotted as in overrides; ``low``/``high`` for uniform, loguniform, int (both
    ends included); ``values`` for choice (sampled) and grid (every value)."""

    key: str = ""
    dist: Literal["uniform", "loguniform", "int", "choice", "grid"] = "uniform"
    low: float = math.nan
    high: float = math.nan
    values: tuple[Scalar, ...] = ()


@dataclass(frozen=True)
class Objective:
    metric: str = "val_balanced_accuracy"
    mode: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class SchedulerConfig:
    kind: Literal["asha", "fifo"] = "asha"
    metric: str = ""  # a per-epoch metric (EPOCH_METRICS); empty = the first objective
    grace_period: int = 1  # epochs every trial runs before it can be stopped
    reduction_factor: int = 2  # ASHA keeps the top 1/reduction_factor at each rung


@dataclass(frozen=True)
class TrackingConfig:
    mlflow: bool = True
    # empty = a SQLite store beside the study (local storage) or under ./ltcore-runs/mlflow/<name>/ (object storage)
    mlflow_uri: str = ""


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    run_config: str = ""  # two_stage.py config file (path or URI; relative to the study file); empty = demo
    run_overrides: tuple[str, ...] = ()
    space: tuple[ParamSpec, ...] = ()
    objectives: tuple[Objective, ...] = (Objective(),)
    search: Literal["optuna", "grid", "random"] = "optuna"
    seed: int = 0  # TPE / random sampler seed
    trials: int = 8  # trials drawn (optuna, random); a grid runs each combination once
    concurrency: int = 2
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # folder the run_config names (the field and the searched values) are relative to; empty = the study file's
    run_config_dir: str = ""
    storage: str = "./ltcore-runs/studies"  # the study is written under <storage>/<name>/
    # A trial whose training workers get no resources within this many seconds fails (rather than wait forever).
    resource_timeout_s: float = 300.0
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


RUN_PREFIX = "run."  # command-line overrides with this prefix go to the run config, the rest to the study
RUN_CONFIG_KEY = "run_config"  # a space entry with this key searches whole run config files


def load_study(path: str | None, overrides: list[str] | None = None,
               default_run_config: str = "") -> tuple[StudyConfig, Config]:
    """The study and its base run config (file + ``run_overrides`` + ``run.*`` command-line overrides), checked.

    Raises:
        ConfigError: an unknown or mistyped field, a bad distribution, an empty space, a bad objective.
    """
    overrides = list(overrides or [])
    run_extra = [o[len(RUN_PREFIX):] for o in overrides if o.startswith(RUN_PREFIX)]
    study = load_config(path, [o for o in overrides if not o.startswith(RUN_PREFIX)], cls=StudyConfig)
    # The run.* overrides join run_overrides (every trial's config, searched files included, gets them), and the
    # run config names are resolved against the study file's folder unless run_config_dir says otherwise.
    study = dataclasses.replace(study, run_overrides=(*study.run_overrides, *run_extra),
                                run_config_dir=study.run_config_dir or (posixpath.dirname(path) if path else ""))
    searched = variant_configs(study)
    if study.run_config:
        base = load_config(run_config_path(study, study.run_config), list(study.run_overrides))
    elif searched:
        base = next(iter(searched.values()))
    else:
        base = load_config(default_run_config or None, list(study.run_overrides))
    check_study(study, base)
    return study, base


def run_config_path(study: StudyConfig, name: str) -> str:
    """A run config name of the study (its ``run_config``, or a searched value) as a path or URI."""
    if study.run_config_dir and "://" not in name and not posixpath.isabs(name):
        return posixpath.join(study.run_config_dir, name)
    return name


def variant_configs(study: StudyConfig) -> dict[str, Config]:
    """The run configs a ``run_config`` space entry searches, by the name the study gives them (empty when the
    study searches no run config files), each with ``run_overrides`` applied.

    Raises:
        ConfigError: a searched file is missing or invalid, or the entry is not a grid or choice of names.
    """
    spec = next((s for s in study.space if s.key == RUN_CONFIG_KEY), None)
    if spec is None:
        return {}
    if spec.dist not in ("grid", "choice") or not spec.values:
        raise ConfigError(f"space {RUN_CONFIG_KEY}: search run config files with dist grid or choice and a "
                          "non-empty 'values' list of file names")
    out: dict[str, Config] = {}
    for name in spec.values:
        path = run_config_path(study, str(name))
        try:
            out[str(name)] = load_config(path, list(study.run_overrides))
        except ConfigError as e:
            raise ConfigError(f"space {RUN_CONFIG_KEY} value {name!r}: {e}") from None
        except FileNotFoundError:
            raise ConfigError(f"space {RUN_CONFIG_KEY} value {name!r}: no config file at {path}") from None
    return out


def _check_value(base_raw: dict, spec: ParamSpec, value: Scalar) -> None:
    try:
        from_dict(apply_overrides(_copy(base_raw), [f"{spec.key}={_text(value)}"]))
    except ConfigError as e:
        raise ConfigError(f"space {spec.key} ({spec.dist}): {e}") from None


def _copy(d: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _text(value: Scalar) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def check_study(study: StudyConfig, base: Config) -> None:
    """Checks that need the run config: every searched key exists and takes the distribution's values."""
    if not study.name or "/" in study.name:
        raise ConfigError(f"name: {study.name!r} must be a non-empty name without '/'")
    if not study.space:
        raise ConfigError("space is empty: name at least one field to search, e.g. "
                          "{key: stage1.lr, dist: loguniform, low: 0.001, high: 0.3}")
    seen: set[str] = set()
    raw = to_dict(base)
    for spec in study.space:
        if spec.key in seen:
            raise ConfigError(f"space: {spec.key} is searched twice")
        seen.add(spec.key)
        if spec.key.startswith(("train.run_id", "train.storage")):
            raise ConfigError(f"space: {spec.key} is set by the study for each trial and cannot be searched")
        if spec.key == RUN_CONFIG_KEY:
            continue  # the files were loaded and checked by variant_configs
        if spec.dist in ("choice", "grid"):
            if not spec.values:
                raise ConfigError(f"space {spec.key}: dist {spec.dist} needs a non-empty 'values' list")
            for v in spec.values:
                _check_value(raw, spec, v)
            continue
        if spec.values:
            raise ConfigError(f"space {spec.key}: dist {spec.dist} takes low/high, not values")
        if math.isnan(spec.low) or math.isnan(spec.high) or not spec.low < spec.high:
            raise ConfigError(f"space {spec.key}: dist {spec.dist} needs low < high (got low={spec.low}, "
                              f"high={spec.high})")
        if spec.dist == "loguniform" and spec.low <= 0:
            raise ConfigError(f"space {spec.key}: loguniform needs low > 0 (got {spec.low})")
        if spec.dist == "int":
            if spec.low != int(spec.low) or spec.high != int(spec.high):
                raise ConfigError(f"space {spec.key}: int needs whole-number low/high (got {spec.low}, {spec.high})")
            _check_value(raw, spec, int(spec.low))
        else:
            _check_value(raw, spec, float(spec.low))
    if study.search == "grid" and any(s.dist != "grid" for s in study.space):
        raise ConfigError("search: grid needs every space entry to be dist: grid")
    if study.search != "grid" and any(s.dist == "grid" for s in study.space) and study.search == "optuna":
        raise ConfigError("search: optuna samples; use dist: choice (or search: grid for an exhaustive grid)")
    if not 1 <= len(study.objectives) <= 2:
        raise ConfigError(f"objectives: one or two (a Pareto front), got {len(study.objectives)}")
    for o in study.objectives:
        if o.metric.startswith("test_"):
            raise ConfigError(f"objectives: {o.metric} is a test-split metric; the test split is never an objective "
                              f"(use the val_ metric)")
        if o.metric not in FINAL_METRICS:
            raise ConfigError(f"objectives: unknown metric {o.metric!r}; choose one of {', '.join(FINAL_METRICS)}")
    if study.trials < 1 or study.concurrency < 1:
        raise ConfigError(f"trials and concurrency must be >= 1 (got {study.trials}, {study.concurrency})")
    sched = study.scheduler
    if sched.kind == "asha":
        metric = scheduler_metric(study)
        if metric not in EPOCH_METRICS:
            raise ConfigError(f"scheduler.metric: {metric!r} is not reported every epoch; ASHA needs one of "
                              f"{', '.join(EPOCH_METRICS)} (set scheduler.metric or scheduler.kind: fifo)")
        if sched.grace_period < 1 or sched.reduction_factor < 2:
            raise ConfigError("scheduler: grace_period must be >= 1 and reduction_factor >= 2")
    if study.resource_timeout_s <= 0:
        raise ConfigError("resource_timeout_s must be > 0")


def scheduler_metric(study: StudyConfig) -> str:
    return study.scheduler.metric or study.objectives[0].metric


def trial_config(base: Config, params: dict[str, Scalar], *, storage: str, run_id: str, dataset: str = "") -> Config:
    """The run config of one trial: ``base`` (the trial's searched run config file, when the study searches
    files) with the searched values, its run folder under the study, and the study's shared dataset version
    when the trial searches nothing on the data side."""
    overrides = [f"{k}={_text(v)}" for k, v in params.items() if k != RUN_CONFIG_KEY]
    overrides += [f"train.storage={storage}", f"train.run_id={run_id}"]
    if dataset:
        overrides.append(f"dataset={dataset}")
    return from_dict(apply_overrides(to_dict(base), overrides))


def searches_data(study: StudyConfig, base: Config | None = None) -> bool:
    """Whether trials differ in the dataset version (a searched ``data.*``, or searched run config files whose
    ``data``/``dataset`` differ from ``base``'s): then each trial prepares its own."""
    if any(s.key.startswith(("data.", "dataset")) for s in study.space):
        return True
    return base is not None and any((v.data, v.dataset) != (base.data, base.dataset)
                                    for v in variant_configs(study).values())
