"""The two-stage job, end to end: dataset version -> stage 1 -> stage 2 -> report.json + plots.

Stages hand over objects and URIs (the manifest URI, the stage-1 ``Checkpoint``), never path conventions.
Everything that can be checked before cluster work starts is checked first (``validate``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray.train
import timm

from ltcore import config, storage
from ltcore.config import Config, ConfigError, to_dict
from ltcore.data.manifest import Manifest, verify_shards
from ltcore.data.sources import EMBEDDED_CLASSES
from ltcore.engine import checkpoint as ckpt
from ltcore.engine import runs
from ltcore.engine.placement import check_shared_storage
from ltcore.eval.metrics import compute_metrics
from ltcore.eval.plots import plot_confusion, plot_recall_vs_count
from ltcore.eval.report import metrics_table, write_report
from ltcore.methods.recipes import stage1_methods
from ltcore.methods.stage2 import FEATURE_CALIBRATORS
from ltcore.models import list_backbones

logger = logging.getLogger("ltcore.pipeline")
STAGE2_METHODS = ("none", *FEATURE_CALIBRATORS, "icc")


def validate(cfg: Config, manifest: Manifest | None = None) -> None:
    """Config checks that need no cluster: method names, backbone name, class names named in config.

    Class names (JRCL's ``stage1.loss.normal_class``) are checked against ``manifest`` when given, else against
    the classes known before prepare (:func:`known_classes`); ``ensure_dataset`` checks the rest as soon as
    prepare has read the source.
    """
    if cfg.stage1.method not in stage1_methods():
        choices = ", ".join(stage1_methods())
        raise ConfigError(f"stage1.method: {cfg.stage1.method!r} is not valid; choose one of {choices}")
    if cfg.stage2.method not in STAGE2_METHODS:
        choices = ", ".join(STAGE2_METHODS)
        raise ConfigError(f"stage2.method: {cfg.stage2.method!r} is not valid; choose one of {choices}")
    if cfg.stage2.method != "none" and cfg.model.head != "linear":
        raise ConfigError(f"stage2.method={cfg.stage2.method} needs model.head=linear (got {cfg.model.head!r})")
    if cfg.model.backbone not in list_backbones() and not timm.is_model(cfg.model.backbone):
        # A name check only: building the network here would cost seconds for large backbones.
        raise ConfigError(f"model.backbone: {cfg.model.backbone!r} is neither an ltcore backbone "
                          f"({', '.join(list_backbones())}) nor a timm model; see timm.list_models('resnet*')")
    known = (manifest.name, manifest.classes) if manifest is not None else known_classes(cfg)
    check_class_names(cfg, *(known or (cfg.data.name, None)))
    if manifest is not None:
        empty = [c for c, n in zip(manifest.classes, manifest.class_counts("train")) if n == 0]
        if empty:
            raise ConfigError(f"dataset {manifest.name!r} has no training images for class(es) {', '.join(empty)}; "
                              "lower data.imbalance_factor or add images")


def known_classes(cfg: Config) -> tuple[str, tuple[str, ...]] | None:
    """``(dataset name, class names)`` where they are known without preparing the dataset, else None.

    ``dataset`` set: read from its manifest (one small file). Otherwise ``data.source.classes`` when listed, or
    the embedded digits' fixed classes. A table or image-folder source that lists no classes is only known once
    prepare has read it. Only JRCL needs class names before training, so for other methods nothing is read.
    """
    if cfg.stage1.method != "jrcl":
        return None
    if cfg.dataset:
        m = Manifest.load(cfg.dataset)
        return m.name, m.classes
    if cfg.data.source.classes:
        return cfg.data.name, tuple(cfg.data.source.classes)
    if cfg.data.source.kind == "embedded":
        return cfg.data.name, EMBEDDED_CLASSES
    return None


def check_class_names(cfg: Config, dataset: str, classes: Sequence[str] | None) -> None:
    """Config values that name a class must name one of ``classes`` (None = not known yet: only emptiness).

    Raises:
        ConfigError: JRCL's ``stage1.loss.normal_class`` is empty or not a class of the dataset.
    """
    if cfg.stage1.method != "jrcl":
        return
    name = cfg.stage1.loss.normal_class
    choices = "" if classes is None else f"; choose one of {', '.join(map(str, classes))}"
    if not name:
        raise ConfigError(f"stage1.loss.normal_class is empty; stage1.method=jrcl needs the dataset's normal "
                          f"class{choices}")
    if classes is not None and name not in classes:
        raise ConfigError(f"stage1.loss.normal_class: {name!r} is not a class of dataset {dataset!r}{choices}")


def checkpoint_uri(cp: ray.train.Checkpoint) -> str:
    """A URI for a Ray checkpoint (local path, or scheme://path on an object store)."""
    fs_type = type(cp.filesystem).__name__
    if fs_type == "LocalFileSystem":
        return cp.path
    if fs_type == "S3FileSystem":
        return "s3://" + cp.path
    return cp.path


def load_predictions(cp: ray.train.Checkpoint) -> dict[str, np.ndarray]:
    with cp.as_directory() as d, np.load(os.path.join(d, ckpt.PRED_FILE)) as z:
        return {k: z[k] for k in z.files}


def stage_report(cfg: Config, result: ray.train.Result, manifest: Manifest) -> dict[str, Any]:
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    assert result.checkpoint is not None
    preds = load_predictions(result.checkpoint)
    counts = manifest.class_counts("train")
    rep: dict[str, Any] = {"checkpoint": checkpoint_uri(result.checkpoint), "last_metrics": dict(result.metrics or {})}
    for split in ("val", "test"):
        rep[split] = compute_metrics(preds[f"{split}_labels"], preds[f"{split}_probs"], list(manifest.classes), counts,
                                     group_rule=cfg.eval.group_rule, many_threshold=cfg.eval.many_threshold,
                                     few_threshold=cfg.eval.few_threshold, ece_bins=cfg.eval.ece_bins)
    return rep


def ensure_dataset(cfg: Config) -> str:
    """The manifest URI of the config's dataset version: ``dataset`` when set, else ``data`` prepared (or found up
    to date). Either way the version's shards are checked to be all there before it is used."""
    if cfg.dataset:
        verify_shards(Manifest.load(cfg.dataset), cfg.dataset)
        return cfg.dataset
    from ltcore.data.prepare import prepare_dataset

    # Class names in the config are checked as soon as prepare has read the source, before it writes anything.
    uri, _up_to_date = prepare_dataset(cfg.data, check_classes=lambda classes: check_class_names(
        cfg, cfg.data.name, classes))
    return uri


def run_two_stage(cfg: Config, *, log: Any = None, start_cluster: Callable[[], None] | None = None) -> str:
    """Run stage 1 (and stage 2 unless ``stage2.method: none``); returns the report.json URI.

    Order: config checks, the run folder (bucket, writable, a resume continues the same config), the dataset
    version (prepare, which reads and checks its source before any cluster work; shards checked), then
    ``start_cluster`` (the entry scripts start or join Ray here) and training. A failure while training is a
    :class:`runs.RunError`: one line naming the run's ``error.log`` and the command that resumes it.
    """
    log = log or logger.info
    t_start = time.perf_counter()
    run, manifest_uri, manifest = open_checked_run(cfg, log=log)
    if start_cluster is not None:
        start_cluster()
    check_shared_storage(cfg)  # a run that spans nodes needs storage every node reaches
    runs.record_run(run, cfg, manifest_uri, manifest.hash)
    stages, timings = train_stages(cfg, run, manifest_uri, manifest)
    timings["total_s"] = time.perf_counter() - t_start
    uri, table = finish_run(cfg, run, manifest_uri, manifest, stages, timings)
    log(table)
    if cfg.tracking.mlflow_uri:  # MLflow tracking (off by default): params, metrics, report, plots, checkpoint
        from ltcore.lifecycle.tracking import log_if_enabled

        log_if_enabled(cfg, uri, log=log)
    return uri


def open_checked_run(cfg: Config, *, log: Any = None) -> tuple[runs.Run, str, Manifest]:
    """Every check that can run before cluster work, in order: the config, the run folder, the dataset version
    (prepared if needed) against the config and against what a resumed run trained on."""
    log = log or logger.info
    validate(cfg)
    run = runs.open_run(cfg)
    manifest_uri = ensure_dataset(cfg)
    manifest = Manifest.load(manifest_uri)
    validate(cfg, manifest)
    if run.unfinished and runs.recorded_dataset(run) not in (None, manifest.hash):
        run = runs.open_run(config.replace(cfg, train=config.replace(cfg.train, run_id=runs.new_run_id())))
    runs.check_dataset(run, manifest.hash)
    state = "new" if not run.resumed else "resuming it"
    if run.unfinished:
        state = "resuming it: the latest unfinished run of this config (set train.run_id to start another)"
    log(f"run {run.run_id}: {state}, {run.uri}")
    return run, manifest_uri, manifest


def train_stages(cfg: Config, run: runs.Run, manifest_uri: str, manifest: Manifest,
                 callbacks: Sequence[Any] = ()) -> tuple[dict[str, Any], dict[str, float]]:
    """Stage 1, then stage 2 on its final checkpoint; each stage's report section and the timings.

    ``callbacks``: Ray Train callbacks for both stages' runs (a study forwards each report to Ray Tune).
    """
    from ltcore.engine.trainer import run_stage1, run_stage2

    stages: dict[str, Any] = {}
    timings: dict[str, float] = {}
    t = time.perf_counter()
    try:
        r1 = run_stage1(cfg, manifest_uri, manifest, run.uri, callbacks=callbacks)
        stages["stage1"] = stage_report(cfg, r1, manifest)
    except Exception as e:
        raise runs.fail(cfg, run, "stage 1", e) from e
    timings["stage1_s"] = time.perf_counter() - t
    if cfg.stage2.method != "none":
        t = time.perf_counter()
        assert r1.checkpoint is not None
        try:
            r2 = run_stage2(cfg, manifest_uri, manifest, run.uri, r1.checkpoint, callbacks=callbacks)
            stages["stage2"] = stage_report(cfg, r2, manifest)
        except Exception as e:
            raise runs.fail(cfg, run, "stage 2", e) from e
        timings["stage2_s"] = time.perf_counter() - t
    return stages, timings


def finish_run(cfg: Config, run: runs.Run, manifest_uri: str, manifest: Manifest, stages: dict[str, Any],
               timings: dict[str, float]) -> tuple[str, str]:
    """Write the plots and ``report.json`` (last: it marks the run finished); returns its URI and the metrics
    table."""
    final = "stage2" if "stage2" in stages else "stage1"
    report = {
        "run_id": run.run_id,
        "run_uri": run.uri,
        "dataset": manifest_uri,
        "dataset_hash": manifest.hash,
        "classes": list(manifest.classes),
        "class_counts": {s: manifest.class_counts(s) for s in manifest.counts},
        "config": to_dict(cfg, redact=True),
        "stages": stages,
        "final_stage": final,
        "model": stages[final]["checkpoint"],
        "metrics": {"val": stages[final]["val"], "test": stages[final]["test"]},
        "timings": timings,
        "throughput_img_s": stages["stage1"]["last_metrics"].get("throughput_img_s"),
    }
    test = stages[final]["test"]
    plot_confusion(test["confusion_matrix"], list(manifest.classes), storage.join(run.uri, "confusion_matrix.png"))
    plot_recall_vs_count(test["per_class_recall"], dict(zip(manifest.classes, manifest.class_counts("train"))),
                         storage.join(run.uri, "recall_vs_count.png"))
    uri = write_report(run.uri, report)
    rows = {f"{name} ({cfg.stage1.method if name == 'stage1' else cfg.stage2.method}) test": st["test"]
            for name, st in stages.items()}
    return uri, metrics_table(rows)
