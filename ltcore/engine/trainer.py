"""Driver side: build the Ray Data inputs and the TorchTrainer for each stage, and run it.

Each stage is a Ray Train run named ``stage1`` / ``stage2`` under ``<storage>/runs/<run_id>/``. Ray Train
keeps the last ``train.keep_checkpoints`` checkpoints there, restarts failed workers from the latest one
(``FailureConfig``), and a new run with the same name and storage path resumes from its snapshot, so
re-running a run id continues it instead of starting over.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from ltcore import logs, storage
from ltcore.config import Config, ConfigError, to_dict
from ltcore.data import ingest
from ltcore.data.ingest import DecodedSplit, EpochClock, IngestSpec, build_dataset
from ltcore.data.manifest import Manifest
from ltcore.data.sampling import stage1_sampling
from ltcore.engine.checkpoint import read_meta
from ltcore.engine.loops import stage1_loop, stage2_loop
from ltcore.methods.recipes import build_stage1

# Splits that are evaluated or feature-extracted: every row must reach exactly one worker.
EXACT_SPLITS = ("val", "test", "train")
# Splits stage 1 reads every epoch, so decoding them once pays (test is read once, after the last epoch).
CACHED_SPLITS = ("train", "val")
logger = logging.getLogger("ltcore.data")


class ShardConfig(ray.train.DataConfig):
    """Training streams are split equally (DDP needs equal step counts); evaluation streams are split exactly.

    Ray Train's default ``streaming_split(equal=True)`` drops up to ``world_size - 1`` rows to even the shards;
    for evaluation and feature extraction that would silently lose test images, so those datasets are split
    with ``equal=False`` (the loops gather their predictions, they do not step DDP on them).
    """

    def __init__(self, exact: tuple[str, ...]) -> None:
        super().__init__()
        self._exact = set(exact)

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any,
                  **kwargs: Any) -> list[dict[str, Any]]:
        rest = {k: v for k, v in datasets.items() if k not in self._exact}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in datasets.items():
            if name not in self._exact:
                continue
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output


def use_gpu(cfg: Config) -> bool:
    if cfg.train.use_gpu == "yes":
        return True
    if cfg.train.use_gpu == "no":
        return False
    return float(ray.cluster_resources().get("GPU", 0)) > 0


def scaling(cfg: Config) -> ray.train.ScalingConfig:
    gpu = use_gpu(cfg)
    total = float(ray.cluster_resources().get("CPU", 0))
    need = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.train.data_cpus
    if need > total:
        # Whole CPUs for every worker leave none for the Ray Data tasks that feed them: the job would hang.
        raise ConfigError(
            f"train.num_workers={cfg.train.num_workers} x train.cpus_per_worker={cfg.train.cpus_per_worker} "
            f"+ train.data_cpus={cfg.train.data_cpus} needs {need:g} CPUs but the cluster has {total:g}; "
            "lower train.cpus_per_worker (fractions are fine) or train.num_workers")
    resources = {"CPU": cfg.train.cpus_per_worker}
    if gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=gpu, resources_per_worker=resources,
                                   placement_strategy=cfg.train.placement_strategy)


#: glibc malloc settings for the Train workers (``train.tune_malloc``). Ray Train runs the training function in a
#: thread of the worker actor; glibc gives such threads their own arena, whose heaps are trimmed and re-grown with
#: every step's activations (each re-faulted page is system time). One arena, no trimming and a 1 GiB top pad keep
#: the memory of one step for the next. Seen on a 2-core machine: 28 -> 36 img/s for a bare EfficientNet-Lite0 step
#: in a non-main thread, system time 19 s -> 6 s (benchmarks/malloc_step.py).
WORKER_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's largest: bigger blocks are mmapped whatever is set
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
}


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment variables of the Train workers: :data:`WORKER_MALLOC_ENV` when ``train.tune_malloc``, where a
    variable set in the driver's environment takes the driver's value."""
    if not cfg.train.tune_malloc:
        return {}
    return {k: os.environ.get(k, v) for k, v in WORKER_MALLOC_ENV.items()}


def run_config(cfg: Config, run_uri: str, name: str) -> ray.train.RunConfig:
    fs, path = storage.arrow_fs(run_uri)
    if storage.is_local(run_uri):
        os.makedirs(path, exist_ok=True)
    return ray.train.RunConfig(  # type: ignore[call-arg]  # Train V2's RunConfig (the default in Ray 2.60)
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        logging_config=ray.train.LoggingConfig(log_level=logs.ray_log_level()),  # Ray Train's own lines
        worker_runtime_env={"env_vars": worker_env(cfg)},
    )


def _epoch_size(cfg: Config, batch_size: int) -> int | None:
    # Smoke runs cap the epoch at max_steps_per_epoch batches per worker.
    if cfg.train.max_steps_per_epoch > 0:
        return cfg.train.max_steps_per_epoch * batch_size * cfg.train.num_workers
    return None


def _dataset(manifest_uri: str, spec: IngestSpec, **kwargs: Any) -> Any:
    # uint8 rows (4x fewer bytes through the object store than float32); the loops normalise each batch on the
    # device it trains on (worker.to_device), which on a GPU is free and cuts the host->device copy by 4x too.
    return build_dataset(manifest_uri, spec, normalize=False, **kwargs)


def decoded_splits(cfg: Config, manifest_uri: str, manifest: Manifest,
                   splits: Sequence[str] = CACHED_SPLITS) -> dict[str, DecodedSplit]:
    """The splits this run decodes once into Ray's object store (``train.cache_decoded``): all of ``splits`` with
    ``yes``; with ``auto``, each in turn while the size bounds together fit ``CACHE_SHARE`` of the object store
    (the rest stream from the shards); none with ``no``. The decoded blocks live as long as the driver holds them."""
    mode = cfg.train.cache_decoded
    budget = ingest.CACHE_SHARE * ingest.object_store_bytes()
    out: dict[str, DecodedSplit] = {}
    for split in splits if mode != "no" else ():
        bound = ingest.decoded_size_bound(manifest, split)
        if mode == "auto" and bound > budget:
            logger.info(f"[data] {split}: decoded per epoch from the shards (up to {bound / 2**20:.0f} MiB decoded "
                        f"is more than {ingest.CACHE_SHARE:.0%} of the object store left; train.cache_decoded=yes "
                        "forces the cache)")
            continue
        t0 = time.perf_counter()
        out[split] = d = ingest.decode_split(manifest_uri, split, num_cpus=cfg.train.data_cpus)
        budget -= bound
        logger.info(f"[data] {split}: {d.rows} images decoded once into Ray's object store ({d.nbytes / 2**20:.0f} "
                    f"MiB, {time.perf_counter() - t0:.1f} s); each epoch draws and augments from there")
    return out


def eval_spec(manifest: Manifest, split: str, cfg: Config) -> IngestSpec:
    return IngestSpec(split=split, views=("test",), image_size=manifest.image_size, q=None, seed=cfg.train.seed,
                      shuffle=False)


def stage1_datasets(cfg: Config, manifest_uri: str, manifest: Manifest, clock: EpochClock) -> dict[str, Any]:
    s1 = cfg.stage1
    decoded = decoded_splits(cfg, manifest_uri, manifest)
    recipe = build_stage1(s1.method, loss_cfg=s1.loss, class_counts=manifest.class_counts("train"),
                          classes=list(manifest.classes), epochs=s1.epochs, proj_dim=cfg.model.proj_dim)
    views = ("strong",) if s1.augment == "strong" and recipe.views == ("weak",) else recipe.views
    # Which stream draws which classes is decided in one place (sampling.stage1_sampling); this only applies it.
    policy = stage1_sampling(q=s1.q, progressive=s1.progressive, pk_classes=s1.pk_classes,
                             tail_stream=recipe.needs_tail_stream)
    streams = {
        name: _dataset(manifest_uri, IngestSpec(
            split="train", views=views, image_size=manifest.image_size, q=p.q, progressive=p.progressive,
            total_epochs=s1.epochs, seed=cfg.train.seed + p.seed_offset, shuffle=True,
            epoch_size=_epoch_size(cfg, s1.batch_size)), epoch_source=clock, num_cpus=cfg.train.data_cpus,
            decoded=decoded.get("train"))
        for name, p in policy.items()
    }
    return streams | {
        "val": _dataset(manifest_uri, eval_spec(manifest, "val", cfg), num_cpus=cfg.train.data_cpus,
                        decoded=decoded.get("val")),
        "test": _dataset(manifest_uri, eval_spec(manifest, "test", cfg), num_cpus=cfg.train.data_cpus),
    }


def stage2_datasets(cfg: Config, manifest_uri: str, manifest: Manifest, clock: EpochClock) -> dict[str, Any]:
    out = {split: _dataset(manifest_uri, eval_spec(manifest, split, cfg), num_cpus=cfg.train.data_cpus)
           for split in ("train", "val", "test")}
    if cfg.stage2.method == "icc":
        # ICC's E-step fine-tunes the backbone on augmented real images, one pass per round.
        aug = IngestSpec(split="train", views=("weak",), image_size=manifest.image_size, q=None, seed=cfg.train.seed,
                         shuffle=True, epoch_size=_epoch_size(cfg, cfg.stage2.batch_size))
        out["train_aug"] = _dataset(manifest_uri, aug, epoch_source=clock, num_cpus=cfg.train.data_cpus)
    return out


def _loop_config(cfg: Config, manifest: Manifest) -> dict[str, Any]:
    # Secrets redacted: Ray may persist the loop config; workers reach object storage through the AWS variables.
    return {"cfg": to_dict(cfg, redact=True), "classes": list(manifest.classes),
            "train_counts": manifest.class_counts("train")}


def _fit(loop: Any, loop_config: dict[str, Any], cfg: Config, run_uri: str, name: str, datasets: dict[str, Any],
         exact: tuple[str, ...], callbacks: Sequence[Any] = ()) -> ray.train.Result:
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling(cfg),
        # callbacks: Ray Train callbacks, e.g. a study's forwarding of each epoch's metrics to Ray Tune
        run_config=dataclasses.replace(run_config(cfg, run_uri, name), callbacks=list(callbacks)),
        datasets=datasets,
        dataset_config=ShardConfig(exact=exact),
        torch_config=TorchConfig(backend="nccl" if use_gpu(cfg) else "gloo"),
    )
    return trainer.fit()


def run_stage1(cfg: Config, manifest_uri: str, manifest: Manifest, run_uri: str,
               callbacks: Sequence[Any] = ()) -> ray.train.Result:
    """Stage 1 as a Ray Train run."""
    clock = EpochClock()  # the workers set it each epoch; the ingest tasks read it (per-epoch re-draws)
    loop_config = _loop_config(cfg, manifest)
    loop_config["epoch_clock"] = clock
    return _fit(stage1_loop, loop_config, cfg, run_uri, "stage1", stage1_datasets(cfg, manifest_uri, manifest, clock),
                exact=("val", "test"), callbacks=callbacks)


def run_stage2(cfg: Config, manifest_uri: str, manifest: Manifest, run_uri: str,
               stage1_checkpoint: ray.train.Checkpoint, callbacks: Sequence[Any] = ()) -> ray.train.Result:
    clock = EpochClock()
    loop_config = _loop_config(cfg, manifest)
    loop_config["stage1_checkpoint"] = stage1_checkpoint
    loop_config["stage1_id"] = read_meta(stage1_checkpoint).get("checkpoint_id")
    loop_config["epoch_clock"] = clock
    return _fit(stage2_loop, loop_config, cfg, run_uri, "stage2", stage2_datasets(cfg, manifest_uri, manifest, clock),
                exact=EXACT_SPLITS, callbacks=callbacks)
