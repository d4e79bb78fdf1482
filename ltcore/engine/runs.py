"""A run's folder, ``<train.storage>/runs/<run_id>/``: opening, resuming, failing.

What the folder holds, and when it is written:

- ``config.yaml`` (secrets redacted) and ``run.json`` (dataset version, start time): written once, when the run
  starts for the first time, and never overwritten. A later start with the same ``train.run_id`` resumes the run
  only if its config equals the recorded one, up to the keys in :data:`RESUMABLE_KEYS` (how much of the machine to
  use, not what is trained); otherwise it is refused with one line naming the keys that differ, before any
  cluster work.
- ``stage1/``, ``stage2/``: Ray Train's checkpoints.
- ``error.log``: the traceback of the last failure, if the run failed; ``report.json``: written last, when the run
  finished. A run folder without ``report.json`` is an unfinished run: resumable by its id, and what a plain rerun
  of the same config (no ``train.run_id``) continues, newest first.
"""

from __future__ import annotations

import datetime as _dt
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

import yaml

from ltcore import storage
from ltcore.config import Config, ConfigError, dump_yaml, flatten, to_dict
from ltcore.errors import root_cause
from ltcore.eval.report import REPORT_NAME

CONFIG_NAME = "config.yaml"
RUN_NAME = "run.json"
ERROR_LOG = "error.log"

# Keys that may differ when a run is resumed: where and on how much hardware it runs, how it logs.
RESUMABLE_KEYS = (
    "train.run_id",
    "train.num_workers",
    "train.use_gpu",
    "train.cpus_per_worker",
    "train.data_cpus",
    "train.max_failures",
    "train.keep_checkpoints",
    "train.eval_batch_size",
    "train.torch_threads",
    "train.progress_every_s",
    "train.placement_strategy",
)
# Compared through the dataset version's hash instead (the same content may live at another URI).
_LOCATION_PREFIXES = ("dataset", "data.output", "data.source.table", "data.source.image_root", "storage.",
                      "tracking.", "retrain.")  # (and how a run is logged and gated: not what it trains)


class RunError(RuntimeError):
    """A run that failed while training; the message is one line and names the log and the rerun command.

    ``bad_input``: what failed inside the cluster was bad input (a config or data error raised by a worker), not
    the run itself; the entry scripts exit 2 for it, as for bad input found before the run, and 1 otherwise.
    """

    def __init__(self, message: str, bad_input: bool = False) -> None:
        super().__init__(message)
        self.bad_input = bad_input


@dataclass(frozen=True)
class Run:
    run_id: str
    uri: str
    resumed: bool  # the folder held this run already (a resume), or it is new
    unfinished: bool = False  # found as the latest unfinished run of the same config (no train.run_id given)


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_uri(cfg: Config, run_id: str) -> str:
    return storage.join(storage.normalize(cfg.train.storage), "runs", run_id)


def _compared(d: dict[str, Any]) -> dict[str, Any]:
    flat = flatten(d)
    return {k: v for k, v in flat.items() if k not in RESUMABLE_KEYS and not k.startswith(_LOCATION_PREFIXES)}


def config_differences(recorded: dict[str, Any], cfg: Config) -> list[str]:
    """Dotted keys whose value in ``cfg`` differs from a run's recorded config (sorted)."""
    old, new = _compared(recorded), _compared(to_dict(cfg))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def open_run(cfg: Config) -> Run:
    """Find or plan the run folder; check it can be written; check a resume continues the same config.

    Writes nothing (on object stores, a probe object that is removed again): the run is recorded by
    :func:`record_run` once every other check has passed.

    Raises:
        storage.StorageError: the storage's bucket does not exist, or the folder cannot be written.
        ConfigError: the run id exists with another config (the message names the keys that differ).
    """
    storage.check_bucket(run_uri(cfg, "x"))
    if not cfg.train.run_id:
        unfinished = latest_unfinished(cfg)
        if unfinished is not None:
            return unfinished
    run_id = cfg.train.run_id or new_run_id()
    uri = run_uri(cfg, run_id)
    cfg_file = storage.join(uri, CONFIG_NAME)
    if storage.exists(cfg_file):
        try:
            recorded = yaml.safe_load(storage.read_text(cfg_file)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"run {run_id}: its {cfg_file} cannot be read ({e}); start a new run "
                              "(another train.run_id)") from None
        diff = config_differences(recorded, cfg)
        if diff:
            flat_old, flat_new = flatten(recorded), flatten(to_dict(cfg, redact=True))
            shown = ", ".join(f"{k} ({flat_old.get(k)!r} -> {flat_new.get(k)!r})" for k in diff[:6])
            more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise ConfigError(f"run {run_id} was started with another config: {shown}{more}; rerun it with its "
                              f"recorded config ({cfg_file}) or start a new run (another train.run_id)")
        return Run(run_id, uri, resumed=True)
    storage.check_writable(uri)
    return Run(run_id, uri, resumed=False)


def latest_unfinished(cfg: Config) -> Run | None:
    """The newest run under the storage that was started with this config (up to :data:`RESUMABLE_KEYS`) and has
    no ``report.json``: a plain rerun after a crash continues it instead of starting over."""
    root = storage.join(storage.normalize(cfg.train.storage), "runs")
    fs, path = storage.fsspec_fs(root)
    try:  # two listings, whatever the number of past runs: which runs started (config.yaml), which finished
        started = {p.rstrip("/").rsplit("/", 2)[-2] for p in fs.glob(f"{path}/*/{CONFIG_NAME}")}
        finished = {p.rstrip("/").rsplit("/", 2)[-2] for p in fs.glob(f"{path}/*/{REPORT_NAME}")}
    except OSError:  # not a folder: the writability check that follows says what is wrong
        return None
    for run_id in sorted(started - finished, reverse=True):  # run ids start with their UTC start time: newest first
        uri = run_uri(cfg, run_id)
        try:
            recorded = yaml.safe_load(storage.read_text(storage.join(uri, CONFIG_NAME))) or {}
        except yaml.YAMLError:
            continue
        if not config_differences(recorded, cfg):
            return Run(run_id, uri, resumed=True, unfinished=True)
    return None


def recorded_dataset(run: Run) -> str | None:
    """The hash of the dataset version a run started on (``None``: a new run, or recorded by an older ltcore)."""
    info_uri = storage.join(run.uri, RUN_NAME)
    if not run.resumed or not storage.exists(info_uri):
        return None
    return storage.read_json(info_uri).get("dataset_hash") or None


def check_dataset(run: Run, dataset_hash: str) -> None:
    """A resumed run must train on the dataset version it started with."""
    recorded = recorded_dataset(run)
    if recorded and recorded != dataset_hash:
        raise ConfigError(f"run {run.run_id} was trained on dataset version {recorded}, this config gives "
                          f"{dataset_hash}; rerun it with its data or start a new run (another train.run_id)")


def record_run(run: Run, cfg: Config, dataset: str, dataset_hash: str) -> None:
    """Write ``config.yaml`` and ``run.json`` of a new run (never over an existing run's)."""
    if run.resumed:
        return
    storage.write_json(storage.join(run.uri, RUN_NAME), {
        "run_id": run.run_id, "dataset": dataset, "dataset_hash": dataset_hash,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    storage.write_text(storage.join(run.uri, CONFIG_NAME), dump_yaml(cfg))  # last: what marks the run as started


def rerun_hint(cfg: Config, run: Run) -> str:
    config = " --config <the same config>" if cfg.train.run_id != run.run_id else ""
    return f"python pipelines/two_stage.py{config} train.run_id={run.run_id} <the same overrides>"


def fail(cfg: Config, run: Run, stage: str, err: BaseException) -> RunError:
    """Write the traceback to ``error.log`` under the run; return the one-line error to raise."""
    log_uri = storage.join(run.uri, ERROR_LOG)
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        storage.write_text(log_uri, text)
        where = f"traceback in {log_uri}"
    except Exception:  # the storage may be what failed; the one line still goes out
        where = "the traceback could not be written to the run's storage"
    root = root_cause(err)
    lines = str(root).strip().splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), "no detail")
    return RunError(f"run {run.run_id} failed in {stage}: {type(root).__name__}: {first[:300]}; {where}; to resume "
                    f"from its last checkpoint: {rerun_hint(cfg, run)}",
                    bad_input=isinstance(root, ValueError | FileNotFoundError))
