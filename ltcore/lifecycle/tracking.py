"""MLflow tracking for ltcore runs: the client for a config, and logging a finished two-stage run.

Where things go:

- the tracking + registry store: ``tracking.mlflow_uri``; ``embedded`` (or empty, for retrain.py) is a SQLite file
  at ``<train.storage>/mlflow.db`` (no server to start). SQLite cannot live on object storage: with an ``s3://``
  storage, give a tracking server URI (clusters) or an explicit ``sqlite:///<local path>``.
- artifacts (report, plots, config, the checkpoint): ``<train.storage>/mlflow-artifacts/`` when the experiment is
  created, local or ``s3://`` (MLflow's S3 artifact store, with the same endpoint and credentials as ltcore's
  storage: ``storage.s3_*`` or ``AWS_ENDPOINT_URL`` -> ``MLFLOW_S3_ENDPOINT_URL``).

Nothing is imported from MLflow at module import: ``import mlflow`` takes seconds, and two_stage.py only pays for it
when tracking is on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from ltcore import storage
from ltcore.config import Config, ConfigError, flatten, to_dict

EMBEDDED = "embedded"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlflow-artifacts"
CHECKPOINT_ARTIFACT = "checkpoint"  # the artifact folder of a run that holds state.pt + meta.json
_BATCH = 100  # MLflow takes at most 100 params / metrics / tags per log_batch call
# Scalars of a split's metrics logged as MLflow metrics (lists and dicts go into report.json).
METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auc_ovr_macro", "many_accuracy", "medium_accuracy",
               "few_accuracy", "ece")


def tracking_uri(cfg: Config, *, default_embedded: bool) -> str | None:
    """The MLflow URI for ``cfg``: None when tracking is off (empty ``tracking.mlflow_uri`` and not
    ``default_embedded``).

    Raises:
        ConfigError: the embedded store was asked for on object storage.
    """
    uri = cfg.tracking.mlflow_uri.strip()
    if not uri and not default_embedded:
        return None
    if uri and uri != EMBEDDED:
        return uri
    root = storage.normalize(cfg.train.storage)
    if not storage.is_local(root):
        raise ConfigError(f"tracking.mlflow_uri: the embedded SQLite store cannot live on {root!r} (object storage); "
                          "set tracking.mlflow_uri to a tracking server (http://host:5000) or "
                          "sqlite:////local/path/mlflow.db")
    path = os.path.join(storage.local_path(root), DB_NAME)
    return "sqlite:///" + os.path.abspath(path)


def artifact_root(cfg: Config) -> str:
    return storage.join(storage.normalize(cfg.train.storage), ARTIFACTS_DIR)


def set_s3_env(cfg: Config) -> None:
    """MLflow's S3 artifact store (boto3) reads its endpoint from ``MLFLOW_S3_ENDPOINT_URL``: give it ltcore's."""
    opts = storage.S3Options(cfg.storage.s3_endpoint_url, cfg.storage.s3_access_key, cfg.storage.s3_secret_key,
                             cfg.storage.s3_region).resolved()
    if opts.endpoint_url and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = opts.endpoint_url
    for key, value in (("AWS_ACCESS_KEY_ID", opts.access_key), ("AWS_SECRET_ACCESS_KEY", opts.secret_key),
                       ("AWS_DEFAULT_REGION", opts.region)):
        if value and not os.environ.get(key):
            os.environ[key] = value


@contextlib.contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """Two processes creating one SQLite store at once both run MLflow's migrations and one fails: serialise the
    first open of a local SQLite file with a file lock beside it."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = uri[len("sqlite:///"):]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".init-lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def client(cfg: Config, *, default_embedded: bool = True) -> Any:
    """An ``mlflow.MlflowClient`` on the config's tracking + registry store (created if it is a new SQLite file)."""
    uri = tracking_uri(cfg, default_embedded=default_embedded)
    if uri is None:
        raise ConfigError("tracking is off: set tracking.mlflow_uri (embedded, or a tracking server URI)")
    set_s3_env(cfg)
    from mlflow import MlflowClient

    with _init_lock(uri):
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)  # opens (and on first use creates) the store under the lock
    return c


def experiment_id(c: Any, cfg: Config) -> str:
    """The id of ``tracking.experiment``, created with its artifacts under the runs' storage if new."""
    from mlflow.exceptions import MlflowException

    name = cfg.tracking.experiment
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(c.create_experiment(name, artifact_location=artifact_root(cfg)))
    except MlflowException:  # created by a concurrent process in between
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def _key(text: str) -> str:
    """An MLflow metric/param key: letters, digits and ``_-. /`` only."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def run_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics of a report, ``<split>_<name>``, and the test split's per-class recall."""
    out: dict[str, float] = {}
    for split, m in report.get("metrics", {}).items():
        for k in METRIC_KEYS:
            v = m.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{split}_{k}"] = float(v)
        if split == "test":
            for cls, r in (m.get("per_class_recall") or {}).items():
                if isinstance(r, int | float):
                    out[_key(f"test_recall_{cls}")] = float(r)
    for k, v in (report.get("timings") or {}).items():
        if isinstance(v, int | float):
            out[_key(f"time_{k}")] = float(v)
    return out


def _copy_dir(uri: str, dest: str, names: tuple[str, ...] | None = None) -> None:
    """Files of a storage folder (or only ``names``) into a local folder."""
    os.makedirs(dest, exist_ok=True)
    wanted = names if names is not None else tuple(u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(uri))
    for name in wanted:
        src = storage.join(uri, name)
        if storage.exists(src):
            with open(os.path.join(dest, name), "wb") as f:
                f.write(storage.read_bytes(src))


def log_two_stage(c: Any, cfg: Config, report_uri: str, *, extra_tags: Mapping[str, str] | None = None) -> str:
    """Log a finished two-stage run to MLflow: params (the resolved config, secrets redacted), metrics, tags, and
    artifacts (report.json, config.yaml, plots, and the final checkpoint under ``checkpoint/``).

    Returns the MLflow run id.
    """
    from mlflow.entities import Metric, Param, RunTag

    report = storage.read_json(report_uri)
    run_folder = str(report["run_uri"])
    tags = {"ltcore.run_id": str(report["run_id"]), "ltcore.run_uri": run_folder,
            "ltcore.dataset": str(report["dataset"]), "ltcore.dataset_hash": str(report["dataset_hash"]),
            "ltcore.model": str(report["model"]), **(extra_tags or {})}
    run = c.create_run(experiment_id(c, cfg), run_name=str(report["run_id"]), tags=tags)
    rid = run.info.run_id
    try:
        params = [Param(_key(k), json.dumps(v) if isinstance(v, list | dict) else str(v))
                  for k, v in flatten(to_dict(cfg, redact=True)).items()]
        metrics = [Metric(k, v, 0, 0) for k, v in run_metrics(report).items()]
        for i in range(0, len(params), _BATCH):
            c.log_batch(rid, params=params[i : i + _BATCH])
        for i in range(0, len(metrics), _BATCH):
            c.log_batch(rid, metrics=metrics[i : i + _BATCH])
        c.log_batch(rid, tags=[RunTag("ltcore.config_hash", training_config_hash(cfg))])
        with tempfile.TemporaryDirectory() as tmp:
            files = os.path.join(tmp, "run")
            _copy_dir(run_folder, files, ("report.json", "config.yaml", "confusion_matrix.png", "recall_vs_count.png"))
            c.log_artifacts(rid, files)
            model = os.path.join(tmp, CHECKPOINT_ARTIFACT)
            _copy_dir(str(report["model"]), model)
            c.log_artifacts(rid, model, CHECKPOINT_ARTIFACT)
    except BaseException:
        c.set_terminated(rid, "FAILED")
        raise
    c.set_terminated(rid, "FINISHED")
    return str(rid)


# Keys that do not change what is trained: where it runs and logs, and how it is gated.
_UNTRAINED_PREFIXES = ("dataset", "data.output", "data.source.table", "data.source.image_root", "storage.",
                       "train.storage", "tracking.", "retrain.")


def training_config_hash(cfg: Config) -> str:
    """sha256 of the config keys that change the model trained on a given dataset version (location, resources,
    logging and gate keys left out). Two configs with one hash train the same model on the same data."""
    import hashlib

    from ltcore.engine.runs import RESUMABLE_KEYS

    flat = {k: v for k, v in flatten(to_dict(cfg)).items()
            if k not in RESUMABLE_KEYS and not k.startswith(_UNTRAINED_PREFIXES)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def log_if_enabled(cfg: Config, report_uri: str, *, log: Any = print) -> str | None:
    """The two-stage job's hook: log the finished run when ``tracking.mlflow_uri`` is set; returns the MLflow run
    id, or None when tracking is off."""
    if tracking_uri(cfg, default_embedded=False) is None:
        return None
    c = client(cfg, default_embedded=False)
    rid = log_two_stage(c, cfg, report_uri)
    log(f"mlflow: run {rid} in experiment {cfg.tracking.experiment!r} ({c.tracking_uri})")
    return rid
