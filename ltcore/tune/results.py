"""A study's outputs: the results table (CSV + markdown), the best config as a runnable YAML, and plots.

Rows are plain dicts (one per trial: id, params, status, stopped-at epoch, every final metric), so this module
needs no Ray: :mod:`ltcore.tune.study` builds the rows from Tune's results. Plots: the objective over trials
(best so far as a line), the Pareto front for two objectives, and Optuna's parameter importances (fANOVA) where
Optuna can compute them (at least two finished trials, a parameter that varies).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from ltcore.config import Config, dump_yaml
from ltcore.eval.plots import save_figure
from ltcore.tune.config import (
    FINAL_METRICS,
    RUN_CONFIG_KEY,
    Objective,
    ParamSpec,
    StudyConfig,
    trial_config,
    variant_configs,
)

OK, STOPPED, ERROR = "ok", "stopped", "error"
TEST_METRICS = tuple("test_" + m[len("val_"):] for m in FINAL_METRICS)


def columns(study: StudyConfig) -> list[str]:
    return ["trial", *(s.key for s in study.space), "status", "stopped_at_epoch", *FINAL_METRICS, *TEST_METRICS,
            "minutes", "error"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def to_csv(study: StudyConfig, rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns(study), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in columns(study)})
    return buf.getvalue()


def to_markdown(study: StudyConfig, rows: Sequence[dict[str, Any]]) -> str:
    cols = [c for c in columns(study) if not c.startswith("test_") and c != "error"]
    cols += ["test_balanced_accuracy", "test_few_accuracy", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _better(o: Objective, a: float, b: float) -> bool:
    return a > b if o.mode == "max" else a < b


def best_row(study: StudyConfig, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished trial best on the first objective (the Pareto front's best on it, for two objectives)."""
    o = study.objectives[0]
    best = None
    for r in rows:
        v = r.get(o.metric)
        if r["status"] == OK and isinstance(v, float) and not math.isnan(v) and (
                best is None or _better(o, v, best[o.metric])):
            best = r
    return best


def pareto_rows(study: StudyConfig, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished trials no other finished trial beats on both objectives."""
    a, b = study.objectives[0], study.objectives[-1]
    done = [r for r in rows if r["status"] == OK]

    def dominates(x: dict, y: dict) -> bool:
        ge = all(not _better(o, y[o.metric], x[o.metric]) for o in (a, b))
        return ge and any(_better(o, x[o.metric], y[o.metric]) for o in (a, b))

    return [r for r in done if not any(dominates(o, r) for o in done if o is not r)]


def best_config_yaml(study: StudyConfig, base: Config, row: dict[str, Any]) -> str:
    """The best trial's run config for ``two_stage.py``: the base config with the trial's values, a new run."""
    params = {s.key: row[s.key] for s in study.space}
    if RUN_CONFIG_KEY in params:  # the best trial's own run config file
        base = variant_configs(study)[str(params[RUN_CONFIG_KEY])]
    cfg = trial_config(base, params, storage=base.train.storage, run_id="")
    head = (f"# Best trial {row['trial']} of study {study.name!r} ({study.objectives[0].metric} = "
            f"{row.get(study.objectives[0].metric)}); run with: python pipelines/two_stage.py --config <this file>\n")
    return head + dump_yaml(cfg)


def plot_objective(study: StudyConfig, rows: Sequence[dict[str, Any]], uri: str) -> str:
    o = study.objectives[0]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    best: float | None = None
    xs, ys, bx, by = [], [], [], []
    for i, r in enumerate(rows):
        v = r.get(o.metric)
        if not isinstance(v, float) or math.isnan(v):
            continue
        xs.append(i)
        ys.append(v)
        if r["status"] == OK:
            best = v if best is None or _better(o, v, best) else best
            bx.append(i)
            by.append(best)
    colors = ["tab:blue" if rows[i]["status"] == OK else "tab:gray" for i in xs]
    ax.scatter(xs, ys, c=colors, label="trial (gray: stopped early, last epoch)")
    ax.step(bx, by, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial (in order of creation)")
    ax.set_ylabel(o.metric)
    ax.legend(fontsize=7)
    return save_figure(fig, uri, dpi=110)


def plot_pareto(study: StudyConfig, rows: Sequence[dict[str, Any]], uri: str) -> str:
    a, b = study.objectives[0].metric, study.objectives[1].metric
    done = [r for r in rows if r["status"] == OK]
    front = pareto_rows(study, rows)
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    ax.scatter([r[a] for r in done], [r[b] for r in done], color="tab:gray", label="trial")
    front = sorted(front, key=lambda r: r[a])
    ax.plot([r[a] for r in front], [r[b] for r in front], "o-", color="tab:red", label="Pareto front")
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.legend(fontsize=7)
    return save_figure(fig, uri, dpi=110)


def param_importances(study: StudyConfig, rows: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """Optuna's importances of the searched fields for the first objective, from the finished trials (None when
    Optuna cannot compute them: fewer than two finished trials, or no field varies)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    o = study.objectives[0]
    done = [r for r in rows if r["status"] == OK]

    def dist(s: ParamSpec) -> Any:
        if s.dist in ("choice", "grid"):
            return CategoricalDistribution(list(s.values))
        if s.dist == "int":
            return IntDistribution(int(s.low), int(s.high))
        return FloatDistribution(s.low, s.high, log=s.dist == "loguniform")

    varying = [s for s in study.space if len({repr(r.get(s.key)) for r in done}) > 1]
    if len(done) < 2 or not varying:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ost = optuna.create_study(direction="maximize" if o.mode == "max" else "minimize")
    for r in done:
        params = {s.key: r[s.key] for s in varying}
        ost.add_trial(optuna.trial.create_trial(params=params, distributions={s.key: dist(s) for s in varying},
                                                value=r[o.metric]))
    try:
        return dict(optuna.importance.get_param_importances(ost))
    except (RuntimeError, ValueError):
        return None


def plot_importances(importances: dict[str, float], metric: str, uri: str) -> str:
    fig = Figure(figsize=(5, 0.5 + 0.4 * len(importances)))
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel(f"importance for {metric} (Optuna, fANOVA)")
    return save_figure(fig, uri, dpi=110)
