"""Typed, frozen configuration: dataclasses loaded from YAML, ``key=value`` overrides checked by type and range.

Every entry script takes ``--config FILE`` and ``section.field=value`` overrides. An unknown key, a value of the
wrong type or a value out of range is a one-line :class:`ConfigError` naming the key and what a valid value is
(``stage1.lr must be > 0, got -0.1``). The resolved config (``to_dict``) is saved with every output.

Why one long module: every section a user can set, with its defaults and its checks, reads in one place; the
loading machinery is the smaller part.

Range checks are declared next to their fields, as dataclass field metadata
(``epochs: int = field(default=10, metadata=check(ge(1)))``), and run in one pass whenever a config is built
(:func:`load_config`, :func:`from_dict`, :func:`replace`); library entry points that take a config section built
in code call :func:`check_config` on it. Checks that need the dataset or the cluster (class names, method names
from the registries, whether the workers fit the CPUs) stay where that knowledge is. Dataclass metadata rather
than pydantic models: the configs are already frozen dataclasses, passed everywhere and built without a config
file (``DataConfig(name=..., image_size=8)``); metadata adds the checks without a second schema system or a new
dependency, and keeps the type coercion and its error messages that overrides already go through.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ---------------------------------------------------------------------------------------------------------------
# Range checks, declared on the fields: ``field(default=..., metadata=check(ge(1)))``


@dataclass(frozen=True)
class Check:
    """A condition on one field's value and what it says in the error: ``<key> must be <must>, got <value>``."""

    ok: Callable[[Any], bool]
    must: str


def _note(text: str, note: str) -> str:
    return f"{text} ({note})" if note else text


def ge(lo: float, note: str = "") -> Check:
    return Check(lambda v: v >= lo, _note(f">= {lo}", note))


def gt(lo: float, note: str = "") -> Check:
    return Check(lambda v: v > lo, _note(f"> {lo}", note))


def in_range(lo: float, hi: float, note: str = "", *, open_hi: bool = False) -> Check:
    """``lo <= v <= hi`` (``lo <= v < hi`` with ``open_hi``)."""
    if open_hi:
        return Check(lambda v: lo <= v < hi, _note(f"in [{lo}, {hi})", note))
    return Check(lambda v: lo <= v <= hi, _note(f"in [{lo}, {hi}]", note))


def nonempty(what: str = "") -> Check:
    return Check(lambda v: len(v) > 0, f"a non-empty {what}" if what else "non-empty")


def check(*checks: Check) -> dict[str, Any]:
    """Field metadata holding range checks: ``field(default=10, metadata=check(ge(1)))``."""
    return {"check": checks}


def check_fields(obj: Any, prefix: str = "", error: type[ValueError] = ConfigError) -> None:
    """Run the checks declared on ``obj``'s own fields (not nested sections); ``prefix`` names ``obj`` in errors.

    Raises:
        ``error`` (:class:`ConfigError` by default): the first field that fails, as
        ``<prefix><field> must be <what>, got <value>``.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for c in f.metadata.get("check", ()):
            if not c.ok(value):
                shown = list(value) if isinstance(value, tuple) else value  # as YAML and overrides write it
                raise error(f"{prefix}{f.name} must be {c.must}, got {shown!r}")


def check_config(cfg: Any, prefix: str = "") -> None:
    """Run every declared check of ``cfg`` and its sections, e.g. ``check_config(data_cfg, "data.")`` for a
    section built in code rather than loaded (loading checks already).

    Raises:
        ConfigError: the first value out of range, as ``<dotted.key> must be <what>, got <value>``.
    """
    check_fields(cfg, prefix)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_config(value, f"{prefix}{f.name}.")


def _folder_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..")


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
    embedded_imbalance: float = field(default=20.0, metadata=check(ge(1)))


@dataclass(frozen=True)
class SplitConfig:
    # fractions of each class's images; they must sum to 1 (checked with the data, in splits.py)
    train: float = field(default=0.7, metadata=check(in_range(0, 1)))
    val: float = field(default=0.1, metadata=check(in_range(0, 1)))
    test: float = field(default=0.2, metadata=check(in_range(0, 1)))


@dataclass(frozen=True)
class DataConfig:
    """The prepare job: raw source -> validated, resized, split dataset version (Parquet + manifest)."""

    name: str = field(default="digits-lt", metadata=check(Check(_folder_name, "a non-empty folder name without '/'")))
    source: SourceConfig = field(default_factory=SourceConfig)
    # dataset versions are written under <output>/<name>/<hash>/
    output: str = field(default="./ltcore-runs/datasets", metadata=check(nonempty("URI for the dataset versions")))
    image_size: int = field(default=32, metadata=check(ge(1)))  # shorter side after resize
    # LMD long-tail subsampling; 0 = keep every image
    imbalance_factor: float = field(default=0.0, metadata=check(Check(lambda v: v == 0 or v >= 1, "0 (off) or >= 1")))
    split: SplitConfig = field(default_factory=SplitConfig)
    seed: int = field(default=0, metadata=check(ge(0)))
    on_bad: Literal["fail", "skip"] = "fail"  # missing/corrupt images and unknown labels
    rows_per_shard: int = field(default=2000, metadata=check(ge(1)))
    # keep only this many rows (stratified by class), 0 = all; for smoke tests
    limit: int = field(default=0, metadata=check(ge(0, "0 = all rows")))
    # A class with fewer images than this in the source is an error (a typo'd label is a class of one image);
    # 0 = one image for each split with a non-zero fraction.
    min_class_images: int = field(default=0, metadata=check(ge(0, "0 = one per split")))


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "small_cnn"  # any timm name, or small_cnn
    pretrained: str = "none"  # none | package | path/URI of a state dict
    head: Literal["linear", "cosine"] = "linear"
    # logit scale of the cosine head (LDAM wants 1: its own s scales the cosines)
    cosine_scale: float = field(default=16.0, metadata=check(gt(0)))
    proj_dim: int = field(default=128, metadata=check(ge(1)))  # projection MLP output for contrastive methods


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
    # weight of the metric loss; "auto": the chosen loss's own default (0.03 triplet, 0.07 centre_triplet, 1.0 supcon)
    metric_lambda: float | Literal["auto"] = "auto"
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
    # L_chan divided by D/4 ("dim"; equals the public B at D=512, B=128, and does not grow with D/B) or by B
    # ("batch", the public code)
    rrl_chan_norm: Literal["dim", "batch"] = "dim"
    # SPMix augmentation (any method)
    spmix: bool = False
    spmix_alpha: float = 0.8
    spmix_prob: float = 0.5
    spmix_patch: int = 16


@dataclass(frozen=True)
class Stage1Config:
    method: str = "ce"  # recipe name; see ltcore.methods.STAGE1 for the list
    epochs: int = field(default=10, metadata=check(ge(1)))
    batch_size: int = field(default=64, metadata=check(ge(1)))  # per worker
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.05, metadata=check(gt(0)))
    momentum: float = field(default=0.9, metadata=check(in_range(0, 1, open_hi=True)))
    weight_decay: float = field(default=5e-4, metadata=check(ge(0)))
    warmup_epochs: int = field(default=0, metadata=check(ge(0)))
    # sampling exponent p_j ~ n_j^q: 1 instance, 0 class-balanced, 0.5 square-root (ltcore.data.sampling)
    q: float = field(default=1.0, metadata=check(in_range(0, 1)))
    progressive: bool = False  # instance -> class-balanced over the epochs
    # P x K class-balanced batches (metric losses): P classes per batch, 0 = off
    pk_classes: int = field(default=0, metadata=check(ge(0, "0 = off")))
    augment: Literal["weak", "strong"] = "weak"
    loss: LossConfig = field(default_factory=LossConfig)


# tau-normalisation's candidate taus, searched on the validation split (Kang et al.): 0.0, 0.1, ..., 2.0
TAU_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))


@dataclass(frozen=True)
class Stage2Config:
    method: str = "none"  # none | crt | tau_norm | lws | posthoc_la | crw | drs | icc
    epochs: int = field(default=10, metadata=check(ge(1)))
    batch_size: int = field(default=64, metadata=check(ge(1)))
    lr: float = field(default=0.1, metadata=check(gt(0)))
    q: float = field(default=0.0, metadata=check(in_range(0, 1)))  # class-balanced by default (cRT, LWS, DRS)
    tau_grid: tuple[float, ...] = field(default=TAU_GRID, metadata=check(nonempty("list of tau values")))
    la_tau: float = 1.0
    icc_rounds: int = field(default=3, metadata=check(ge(1)))
    icc_virtual_per_class: int = field(default=500, metadata=check(ge(1)))
    icc_lr: float = field(default=0.001, metadata=check(gt(0)))  # backbone learning rate of the E-step
    # classifier learning rate of the M-step (a fresh classifier per round, one pass)
    icc_m_lr: float = field(default=0.1, metadata=check(gt(0)))
    icc_gce_q: float = field(default=0.7, metadata=check(in_range(0, 1)))
    icc_fdc_weight: float = field(default=1e-4, metadata=check(ge(0)))


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train settings shared by both stages."""

    storage: str = "./ltcore-runs"  # runs are written under <storage>/runs/<run_id>/
    run_id: str = ""  # empty = new id; an existing id resumes that run
    num_workers: int = field(default=2, metadata=check(ge(1)))
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    cpus_per_worker: float = field(default=1.0, metadata=check(gt(0)))
    # CPUs per Ray Data read/resample/decode task; tasks need CPUs left beside the workers
    data_cpus: float = field(default=0.5, metadata=check(gt(0)))
    max_failures: int = field(default=1, metadata=check(ge(-1, "-1 = retry without limit")))  # Ray's FailureConfig
    keep_checkpoints: int = field(default=2, metadata=check(ge(1)))
    seed: int = field(default=0, metadata=check(ge(0)))
    max_steps_per_epoch: int = field(default=0, metadata=check(ge(0, "0 = full epochs")))  # smoke tests cap it
    eval_batch_size: int = field(default=256, metadata=check(ge(1)))
    shuffle_buffer: int = field(default=256, metadata=check(ge(0, "0 = off")))
    # Decode stage 1's train and val splits once into Ray's object store and draw + augment from there each epoch
    # (no JPEG decode per epoch): auto = when their size bound fits ltcore.data.ingest.CACHE_SHARE of the object
    # store; yes = always (the run fails if they do not fit); no = decode from the shards every epoch (streaming).
    cache_decoded: Literal["auto", "yes", "no"] = "auto"
    # Intra-op threads per worker; 0 = Ray's default (one per CPU the worker reserves). On a small CPU machine
    # where decoding needs less than the CPUs set aside for it, more threads use the idle cores.
    torch_threads: int = field(default=0, metadata=check(ge(0, "0 = one per worker CPU")))
    # glibc malloc settings for the Train workers (ltcore.engine.trainer.WORKER_MALLOC_ENV: one arena, no trimming,
    # a 1 GiB top pad): each step's activations reuse the heap instead of being faulted in again. Measured 1.3x the
    # images/s of a training step on CPU (benchmarks/README.md); a variable set in the driver's environment keeps
    # the driver's value. No effect on other allocators (LD_PRELOAD'ed jemalloc/tcmalloc) or off Linux.
    tune_malloc: bool = True
    # A progress line from the first worker every this many seconds within an epoch (0 = per-epoch lines only).
    progress_every_s: float = field(default=60.0, metadata=check(ge(0, "0 = off")))
    # How Ray places the workers' bundles (Ray's placement-group strategies): PACK fills a node first, SPREAD
    # prefers different nodes, STRICT_SPREAD needs one node per worker (fails to start with fewer nodes).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"


@dataclass(frozen=True)
class EvalConfig:
    group_rule: Literal["rank", "count"] = "rank"
    many_threshold: int = field(default=100, metadata=check(ge(0)))
    few_threshold: int = field(default=20, metadata=check(ge(0)))
    ece_bins: int = field(default=15, metadata=check(ge(1)))


@dataclass(frozen=True)
class StorageConfig:
    s3_endpoint_url: str = ""  # empty = AWS_ENDPOINT_URL
    # Secrets: never written to config.yaml, report.json or logs (``to_dict(redact=True)``); prefer the
    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables.
    s3_access_key: str = field(default="", metadata={"secret": True})
    s3_secret_key: str = field(default="", metadata={"secret": True})
    s3_region: str = ""
    # Local paths that every node of the cluster mounts at the same place (NFS, EFS, a Kubernetes volume). On a
    # cluster of more than one node, local train.storage / data.output / dataset paths must lie under one of
    # these (or be object-store URIs): anything else is one node's disk, and the run is refused before training.
    shared_paths: tuple[str, ...] = ()


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
    obj = cls(**kwargs)
    check_fields(obj, prefix)  # sections were checked when _coerce built them
    return obj


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
    """``dataclasses.replace`` with dotted keys: ``replace(cfg, **{"stage1.epochs": 1})``; the changed sections
    are checked (:class:`ConfigError` on a value out of range)."""
    return _replace(cfg, changes, "")


def _replace(cfg: Any, changes: dict[str, Any], prefix: str) -> Any:
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for k, v in changes.items():
        head, _, rest = k.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = v
        else:
            flat[head] = v
    for head, sub in nested.items():
        flat[head] = _replace(getattr(cfg, head), sub, f"{prefix}{head}.")
    out = dataclasses.replace(cfg, **flat)
    check_fields(out, prefix)
    return out
