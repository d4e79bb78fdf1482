"""Scheduled retraining: newest data -> (if anything changed) two-stage job -> model version -> gate -> alias.

One call of :func:`retrain`, under the registry lock (:class:`ltcore.lifecycle.registry.RegistryLock`):

1. prepare the newest data as a dataset version that extends the champion's (groups already assigned keep their
   split, so the test images the champion was judged on stay test; a new version only if the content changed);
2. nothing to do when a version of this model was already trained on this data version with this training config
   (the champion, or a challenger the gate kept out); a registered version whose gate never finished (a retrain
   killed between registering and aliasing) is gated now, without training again;
3. otherwise the two-stage job, logged to MLflow, registered as a new model version (decision tag ``pending``);
4. challenger and champion are evaluated in this process on the same test split (the new version's, which holds
   the champion's test images) with the same code, and :func:`ltcore.lifecycle.gate.decide` rules;
5. promoted: the alias moves (compare-and-set), then the decision is recorded; kept: the decision is recorded and
   the alias stays. Every decision, nothing-to-do included, is in the registered model's decision log.

The version's decision tag is written after the alias moved, so a retrain killed in between leaves the old champion
serving and a ``pending`` version that the next retrain gates.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ltcore import config, storage
from ltcore.config import Config
from ltcore.data.manifest import Manifest
from ltcore.lifecycle import gate, registry, tracking

Outcome = Literal["promoted", "kept", "nothing to do"]
# Exit status of retrain.py per outcome: 0 = the alias points at the best model we have (promoted, or nothing to
# do); 3 = the challenger was kept out (worth a look). Failures are 1, bad input 2 (ltcore.cli.run_main).
EXIT_CODES: dict[str, int] = {"promoted": 0, "nothing to do": 0, "kept": 3}
LAST_LINE = {"promoted": "promoted", "kept": "kept champion", "nothing to do": "nothing to do"}


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    message: str
    version: str | None = None  # the challenger's model version, when there is one
    champion: str | None = None  # the version holding the alias afterwards

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    @property
    def last_line(self) -> str:
        return f"{LAST_LINE[self.outcome]}: {self.message}"


def model_name(cfg: Config) -> str:
    return cfg.tracking.model_name or cfg.data.name


def retrain(cfg: Config, *, log: Any = print, start_cluster: Callable[[], None] | None = None) -> Result:
    """Run one retrain (module docstring). Bad config or input raises before any cluster work starts.

    Raises:
        ConfigError, ValueError, storage.StorageError: bad input (entry scripts: one line, exit 2).
        ltcore.engine.runs.RunError: training failed (one line naming the run's error.log).
    """
    from ltcore.engine.pipeline import validate

    validate(cfg)
    if cfg.retrain.tolerance_balanced_accuracy < 0 or cfg.retrain.tolerance_few_accuracy < 0:
        raise config.ConfigError("retrain.tolerance_* must be >= 0")
    if not cfg.retrain.alias:
        raise config.ConfigError("retrain.alias is empty; the serving alias is usually 'champion'")
    storage.check_bucket(storage.join(storage.normalize(cfg.train.storage), "x"))
    c = tracking.client(cfg, default_embedded=True)
    name = model_name(cfg)
    lock = registry.RegistryLock(c, name, cfg.retrain.lock_ttl_s)
    try:
        lock.acquire()
    except registry.LockHeld as e:
        return Result("nothing to do", str(e))
    try:
        return _retrain_locked(cfg, c, name, log, start_cluster)
    finally:
        lock.release()


def _retrain_locked(cfg: Config, c: Any, name: str, log: Any, start_cluster: Callable[[], None] | None) -> Result:
    from ltcore.engine import runs
    from ltcore.engine.pipeline import finish_run, open_checked_run, train_stages

    alias = cfg.retrain.alias
    champion = registry.alias_version(c, name, alias)
    champ_v = None if champion is None else str(champion.version)
    log(f"registry: {c.tracking_uri}, model {name!r}, {alias}: "
        f"{'none yet' if champion is None else f'version {champ_v}'}")

    manifest_uri = prepare(cfg, champion)
    manifest = Manifest.load(manifest_uri)
    cfg = config.replace(cfg, dataset=manifest_uri)
    chash = tracking.training_config_hash(cfg)
    same = [v for v in registry.versions(c, name)
            if v.tags.get("ltcore.dataset_hash") == manifest.hash and v.tags.get("ltcore.config_hash") == chash]
    done = [v for v in same if v.tags.get(registry.DECISION_TAG) in ("promoted", "kept")]
    if champion is not None and any(str(v.version) == champ_v for v in same):
        return _nothing(c, name, f"{alias} (version {champ_v}) was trained on this data (version {manifest.hash[:12]}) "
                                 "with this config", champ_v)
    if done:
        v = done[-1]
        return _nothing(c, name, f"version {v.version} was trained on this data with this config and the gate "
                                 f"{v.tags.get(registry.DECISION_TAG)} it", champ_v)

    pending = [v for v in same if v.tags.get(registry.DECISION_TAG) == "pending"]
    if pending:
        mv = pending[-1]
        log(f"version {mv.version} was registered for this data and config but never gated: gating it now")
    else:
        run, manifest_uri, manifest = open_checked_run(cfg, log=log)
        if start_cluster is not None:
            start_cluster()
        runs.record_run(run, cfg, manifest_uri, manifest.hash)
        stages, timings = train_stages(cfg, run, manifest_uri, manifest)
        report_uri, table = finish_run(cfg, run, manifest_uri, manifest, stages, timings)
        log(table)
        rid = tracking.log_two_stage(c, cfg, report_uri)
        mv = registry.register(c, name, rid, version_tags(cfg, storage.read_json(report_uri), manifest, chash))
        log(f"registered {name} version {mv.version} (mlflow run {rid}; report {report_uri})")
    return _gate(cfg, c, name, mv, champion, manifest_uri, manifest, log)


def _nothing(c: Any, name: str, why: str, champion: str | None) -> Result:
    registry.record_decision(c, name, {"outcome": "nothing to do", "reason": why, "champion": champion})
    return Result("nothing to do", why, None, champion)


def prepare(cfg: Config, champion: Any | None) -> str:
    """The newest data as a dataset version (prepared if needed); with a champion, extending its dataset version so
    that its test images stay test. ``dataset`` set in the config: that version, as given."""
    from ltcore.engine.pipeline import check_class_names, ensure_dataset

    previous = champion.tags.get("ltcore.dataset") if champion is not None else None
    if cfg.dataset or not previous:
        return ensure_dataset(cfg)
    from ltcore.data.prepare import prepare_dataset

    uri, _ = prepare_dataset(cfg.data, previous=previous,
                             check_classes=lambda classes: check_class_names(cfg, cfg.data.name, classes))
    return uri


def version_tags(cfg: Config, report: dict[str, Any], manifest: Manifest, config_hash: str) -> dict[str, str]:
    """What a model version carries: its run, dataset version, config hash, how to feed it images, test metrics and
    per-class recall."""
    test = report["metrics"]["test"]
    tags = {
        "ltcore.run_id": str(report["run_id"]),
        "ltcore.run_uri": str(report["run_uri"]),
        "ltcore.dataset": str(report["dataset"]),
        "ltcore.dataset_hash": manifest.hash,
        "ltcore.config_hash": config_hash,
        "ltcore.checkpoint": str(report["model"]),
        "ltcore.image_size": str(manifest.image_size),
        "ltcore.image_format": image_format(manifest),
        "ltcore.method": f"{cfg.stage1.method}+{cfg.stage2.method}",
    }
    for k in tracking.METRIC_KEYS:
        tags[f"test.{k}"] = str(test.get(k))
    for cls, r in (test.get("per_class_recall") or {}).items():
        tags[f"test.recall.{cls}"] = str(r)
    return tags


def image_format(manifest: Manifest) -> str:
    """How prepare re-encoded the images of a version (prediction re-encodes new images the same way)."""
    kind = (manifest.prepare_config.get("source") or {}).get("kind", "")
    return "PNG" if kind == "embedded" else "JPEG"


def split_metrics(cfg: Config, checkpoint_dir: str, manifest_uri: str, manifest: Manifest) -> dict[str, Any]:
    """A checkpoint's metrics on the test split of a dataset version, in this process (evaluate.py's code)."""
    from ltcore.engine import checkpoint as ckpt
    from ltcore.engine.evaluate import model_from_checkpoint, predict
    from ltcore.eval.metrics import compute_metrics

    model, meta = model_from_checkpoint(checkpoint_dir)
    if list(meta["classes"]) != list(manifest.classes):
        raise ckpt.CheckpointError(f"model classes {meta['classes']} differ from the dataset's "
                                   f"{list(manifest.classes)}: the gate cannot compare them; register a model for "
                                   "the new class list by hand")
    probs, labels = predict(model, manifest_uri, "test", manifest.image_size, cfg.train.eval_batch_size)
    return compute_metrics(labels, probs, list(manifest.classes), manifest.class_counts("train"),
                           group_rule=cfg.eval.group_rule, many_threshold=cfg.eval.many_threshold,
                           few_threshold=cfg.eval.few_threshold, ece_bins=cfg.eval.ece_bins)


def _gate(cfg: Config, c: Any, name: str, mv: Any, champion: Any | None, manifest_uri: str, manifest: Manifest,
          log: Any) -> Result:
    alias = cfg.retrain.alias
    with tempfile.TemporaryDirectory() as tmp:
        ch = split_metrics(cfg, registry.download_checkpoint(mv, f"{tmp}/challenger"), manifest_uri, manifest)
        cp = None
        if champion is not None:
            cp = split_metrics(cfg, registry.download_checkpoint(champion, f"{tmp}/champion"), manifest_uri, manifest)
    d = gate.decide(ch, cp, tol_balanced_accuracy=cfg.retrain.tolerance_balanced_accuracy,
                    tol_few_accuracy=cfg.retrain.tolerance_few_accuracy)
    champ_v = None if champion is None else str(champion.version)
    record = {**d.to_dict(), "challenger_version": str(mv.version), "champion_version": champ_v,
              "dataset_hash": manifest.hash, "test_images": int(ch["n_samples"])}
    nums = (f"balanced accuracy {d.challenger['balanced_accuracy']:.4f}, few-shot {d.challenger['few_accuracy']:.4f}"
            + ("" if d.champion is None else f" vs {alias} {d.champion['balanced_accuracy']:.4f}, "
               f"{d.champion['few_accuracy']:.4f}"))
    log(f"gate: version {mv.version} {nums} on {int(ch['n_samples'])} test images: {d.outcome} ({d.reason})")
    if d.outcome == "promoted":
        registry.set_alias(c, name, alias, str(mv.version), expected=champ_v)
        registry.record_decision(c, name, record, str(mv.version))
        return Result("promoted", f"{name} version {mv.version} is {alias} ({nums})", str(mv.version),
                      str(mv.version))
    registry.record_decision(c, name, record, str(mv.version))
    return Result("kept", f"{name} version {champ_v} stays {alias}; version {mv.version} kept out: {d.reason}",
                  str(mv.version), champ_v)
