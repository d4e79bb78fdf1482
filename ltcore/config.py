"""Typed, frozen configuration: dataclasses loaded from YAML, ``key=value`` overrides checked by type.

Every entry script takes ``--config FILE`` and ``section.field=value`` overrides. An unknown key or a value of
the wrong type is a one-line :class:`ConfigError` naming the key and the valid choices. The resolved config
(``to_dict``) is saved with every output.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class SourceConfig:
    """Where the raw images and labels are. No code per dataset: all of it is set here."""

    kind: Literal["embedded", "table", "imagefolder"] = "embedded"
    table: str = ""  # URI of a CSV or Parquet label table (kind=table)
    image_root: str = ""  # URI prefix of the images (table), or the root with one folder per class (imagefolder)
    id_column: str = "image_id"
    path_template: str = "{id}.jpg"  # image path under image_root; {id} is the id column's value
    label_column: str = "dx"  # single label column ...
    label_columns: tuple[str, ...] = ()  # ... or one-hot label columns (ISIC 2019 layout); wins when set
    group_column: str = ""  # patient / lesion id: a group never crosses splits; empty = each image its own group
    # A predefined split (train / val / test) per row, e.g. a publisher's official test list; rows with an empty
    # cell are split by the seeded rule. Empty = no such column.
    split_column: str = ""
    classes: tuple[str, ...] = ()  # class order; empty = sorted label names
    # embedded digits: the sklearn set made long-tailed with this imbalance factor, upscaled to image_size
    embedded_imbalance: float = 20.0


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2


@dataclass(frozen=True)
class DataConfig:
    """The prepare job: raw source -> validated, resized, split dataset version (Parquet + manifest)."""

    name: str = "digits-lt"
    source: SourceConfig = field(default_factory=SourceConfig)
    output: str = "./ltcore-runs/datasets"  # dataset versions are written under <output>/<name>/<hash>/
    image_size: int = 32  # shorter side after resize
    imbalance_factor: float = 0.0  # LMD long-tail subsampling; 0 = keep every image
    split: SplitConfig = field(default_factory=SplitConfig)
    seed: int = 0
    on_bad: Literal["fail", "skip"] = "fail"  # missing/corrupt images and unknown labels
    rows_per_shard: int = 2000
    limit: int = 0  # keep only this many rows (stratified by class), 0 = all; for smoke tests
    # A class with fewer images than this in the source is an error (a typo'd label is a class of one image);
    # 0 = one image for each split with a non-zero fraction.
    min_class_images: int = 0


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "small_cnn"  # any timm name, or small_cnn
    pretrained: str = "none"  # none | package | path/URI of a state dict
    head: Literal["linear", "cosine"] = "linear"
    cosine_scale: float = 16.0  # logit scale of the cosine head (LDAM wants 1: its own s scales the cosines)
    proj_dim: int = 128  # projection MLP output for contrastive methods


@dataclass(frozen=True)
class LossConfig:
    """Parameters of the stage-1 losses (METHODS.md gives each default's source)."""

    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    cb_beta: float = 0.9999
    ldam_max_margin: float = 0.5
    ldam_s: float = 30.0
    drw_start: float = 0.8  # fraction of epochs before deferred re-weighting starts
    la_tau: float = 1.0
    # metric learning (Zeng et al.)
    metric_loss: Literal["triplet", "centre_triplet", "supcon"] = "supcon"
    metric_lambda: float = 1.0
    metric_margin: float = 0.2
    temperature: float = 0.1
    # ProCo
    proco_lambda: float = 1.0
    proco_momentum: float = 0.99
    proco_queue: int = 4096
    proco_eps: float = 0.1
    proco_gamma: float = 0.5
    # JRCL
    normal_class: str = "nv"
    bdc_symmetric: bool = False
    # LMD RRL
    rrl_start_epoch: int = 20
    rrl_w_prob: float = 5.0
    rrl_w_batch: float = 10.0
    rrl_w_chan: float = 10.0
    # SPMix augmentation (any method)
    spmix: bool = False
    spmix_alpha: float = 0.8
    spmix_prob: float = 0.5
    spmix_patch: int = 16


@dataclass(frozen=True)
class Stage1Config:
    method: str = "ce"  # recipe name; see ltcore.methods.STAGE1 for the list
    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    q: float = 1.0  # sampling exponent p_j ~ n_j^q: 1 instance, 0 class-balanced, 0.5 square-root
    progressive: bool = False  # instance -> class-balanced over the epochs
    pk_classes: int = 0  # P x K class-balanced batches (metric losses): P classes per batch, 0 = off
    augment: Literal["weak", "strong"] = "weak"
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass(frozen=True)
class Stage2Config:
    method: str = "none"  # none | crt | tau_norm | lws | posthoc_la | crw | drs | icc
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    q: float = 0.0  # class-balanced by default (cRT, LWS, DRS)
    tau_grid: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))
    la_tau: float = 1.0
    icc_rounds: int = 3
    icc_virtual_per_class: int = 500
    icc_lr: float = 0.001  # backbone learning rate of the E-step
    icc_m_lr: float = 0.1  # classifier learning rate of the M-step (a fresh classifier per round, one pass)
    icc_gce_q: float = 0.7
    icc_fdc_weight: float = 1e-4


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train settings shared by both stages."""

    storage: str = "./ltcore-runs"  # runs are written under <storage>/runs/<run_id>/
    run_id: str = ""  # empty = new id; an existing id resumes that run
    num_workers: int = 2
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    cpus_per_worker: float = 1.0
    data_cpus: float = 0.5  # CPUs per Ray Data read/resample/decode task; tasks need CPUs left beside the workers
    max_failures: int = 1
    keep_checkpoints: int = 2
    seed: int = 0
    max_steps_per_epoch: int = 0  # 0 = full epochs; smoke tests cap it
    eval_batch_size: int = 256
    shuffle_buffer: int = 256
    # Intra-op threads per worker; 0 = Ray's default (one per CPU the worker reserves). On a small CPU machine
    # where decoding needs less than the CPUs set aside for it, more threads use the idle cores.
    torch_threads: int = 0
    # A progress line from the first worker every this many seconds within an epoch (0 = per-epoch lines only).
    progress_every_s: float = 60.0


@dataclass(frozen=True)
class EvalConfig:
    group_rule: Literal["rank", "count"] = "rank"
    many_threshold: int = 100
    few_threshold: int = 20
    ece_bins: int = 15


@dataclass(frozen=True)
class StorageConfig:
    s3_endpoint_url: str = ""  # empty = AWS_ENDPOINT_URL
    # Secrets: never written to config.yaml, report.json or logs (``to_dict(redact=True)``); prefer the
    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables.
    s3_access_key: str = field(default="", metadata={"secret": True})
    s3_secret_key: str = field(default="", metadata={"secret": True})
    s3_region: str = ""


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking and model registry (``ltcore.lifecycle``)."""

    # "" = off for two_stage.py (retrain.py then uses the embedded store); "embedded" = a SQLite store at
    # <train.storage>/mlflow.db (local storage only: SQLite cannot live on object storage); otherwise any MLflow
    # tracking URI (http://tracking-server:5000 on clusters, sqlite:///path/to/mlflow.db).
    mlflow_uri: str = ""
    experiment: str = "ltcore"  # artifacts go to <train.storage>/mlflow-artifacts when the experiment is created
    model_name: str = ""  # registered model name; "" = data.name


@dataclass(frozen=True)
class RetrainConfig:
    """The retrain gate: promote the challenger only if it is no worse than the champion on the frozen test split."""

    tolerance_balanced_accuracy: float = 0.0  # promote if bacc >= champion bacc - this
    tolerance_few_accuracy: float = 0.0  # ... and few-shot accuracy >= champion's - this
    alias: str = "champion"
    # A retrain holds a lock on the registry while it runs; a holder that stops renewing it (killed) loses it
    # after this many seconds, or at once when it ran on this host and its process is gone.
    lock_ttl_s: float = 600.0


@dataclass(frozen=True)
class Config:
    dataset: str = ""  # manifest URI of a prepared dataset version; empty = prepare `data` first
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)


# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides, validation


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against type ``tp`` and return it in canonical form (tuples for lists)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not valid; choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if origin is tuple:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        inner = get_args(tp)[0]
        return tuple(_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema error, not user error


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in hints:
            raise ConfigError(f"unknown config key '{prefix}{k}'; valid keys here: {', '.join(names)}")
        kwargs[k] = _coerce(prefix + k, hints[k], v)
    return cls(**kwargs)


REDACTED = "<redacted>"


def to_dict(cfg: Any, *, redact: bool = False) -> dict[str, Any]:
    """Plain nested dict (lists for tuples). ``redact=True``: secret fields (``metadata={"secret": True}``) that
    are set read :data:`REDACTED`; that is the form written to ``config.yaml``, ``report.json`` and logs."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: REDACTED if redact and f.metadata.get("secret") and getattr(v, f.name)
                    else conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)  # type: ignore[no-any-return]


def from_dict(raw: dict[str, Any], cls: type = Config) -> Any:
    return _build(cls, raw or {})


def _set_path(raw: dict[str, Any], cls: type, key: str, text: str) -> None:
    parts = key.split(".")
    node: Any = raw
    node_cls: Any = cls
    for i, part in enumerate(parts):
        hints = _hints(node_cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "top level"
            names = ", ".join(f.name for f in dataclasses.fields(node_cls))
            raise ConfigError(f"unknown config key {key!r} ({part!r} is not in {where}); valid keys: {names}")
        tp = hints[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                first = dataclasses.fields(tp)[0].name
                raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.{first}=...")
            node[part] = yaml.safe_load(text) if text != "" else ""
            wants_str = tp is str or (get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp)))
            if wants_str and not isinstance(node[part], str):
                node[part] = text  # keep strings verbatim ("007" as a name, "no" as a choice rather than false)
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section; it takes a value")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} must be a mapping in the config file")
        node_cls = tp


def apply_overrides(raw: dict[str, Any], overrides: list[str], cls: type = Config) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a raw nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. stage1.epochs=5)")
        key, text = item.split("=", 1)
        _set_path(raw, cls, key.strip(), text.strip())
    return raw


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: str, seen: tuple[str, ...]) -> dict[str, Any]:
    """A config file as a raw dict; ``base: other.yaml`` (relative to this file) is loaded first and overlaid."""
    import posixpath

    from ltcore import storage

    if path in seen:
        raise ConfigError(f"config file {path!r} includes itself through 'base'")
    try:
        text = storage.read_text(path)
    except storage.StorageError as e:
        raise ConfigError(f"config file: {e}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    base = raw.pop("base", None)
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"config file {path!r}: 'base' must be a file name")
        if "://" not in base and not posixpath.isabs(base):
            base = posixpath.join(posixpath.dirname(path), base)
        raw = _merge(_read_yaml(base, (*seen, path)), raw)
    return raw


def load_config(path: str | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Load a YAML config (path or URI), apply overrides, validate; returns a frozen ``cls``."""
    raw = _read_yaml(path, ()) if path else {}
    raw = apply_overrides(raw, overrides or [], cls)
    return from_dict(raw, cls)


def dump_yaml(cfg: Any) -> str:
    """The config as YAML, secrets redacted."""
    return yaml.safe_dump(to_dict(cfg, redact=True), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: dotted keys, as overrides name them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` with dotted keys: ``replace(cfg, **{"stage1.epochs": 1})``."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for k, v in changes.items():
        head, _, rest = k.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = v
        else:
            flat[head] = v
    for head, sub in nested.items():
        flat[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)
