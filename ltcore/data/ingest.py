"""Ingest: a dataset version's split as a per-epoch rebalanced, shuffled, augmented stream.

Two front ends over the same sampling (:mod:`ltcore.data.sampling`) and transforms (:mod:`ltcore.data.transforms`):

- :func:`build_dataset` -> ``ray.data.Dataset`` for Ray Train (``TorchTrainer(datasets={"train": ...})``).
- :func:`iter_epoch_local` -> torch batches in one process without Ray (tests, evaluation, notebooks).

Why one long module: both front ends share the spec, the shard reading, the per-epoch draws and the decode
step, and must stay identical; splitting them would put one algorithm in two files.

Per epoch, the Ray pipeline is::

    from_items(shard URIs)
    -> randomize_block_order                shard order changes every execution (shuffle=True)
    -> map_batches(read + resample)         one task per Parquet shard: id, image (encoded bytes), label; each
                                            row repeated r_i times, r_i drawn per (seed, epoch, row id); rows
                                            permuted inside the shard (shuffle=True)
    [-> repartition(rows per block)]        only when the split has too few shards to keep every decode slot busy
                                            (:func:`cut_shards`); otherwise the read tasks take a tenth of a decode
                                            task's CPUs, at most one per decode slot
    -> map_batches(decode + augment)        image (3, S, S) [, image2], label int64; one task per block

and the consumer adds a local shuffle buffer (``iter_torch_batches(local_shuffle_buffer_size=...)``). There is
no global all-to-all shuffle and no per-class branch: one pass over the rows per epoch. Batches mix shards only
through that buffer and the concurrent decode tasks, so shards should be random samples of the split (a version
whose shards are sorted by class gives class-clustered batches).

Rows are float32 normalised images by default. With ``normalize=False`` they stay uint8 and the consumer
normalises (``collate_fn=normalize_collate_fn()``, or :func:`~ltcore.data.transforms.normalize_images` on the GPU):
the same numbers, a quarter of the bytes through Ray's object store and about 0.5 ms less CPU per image at 224 px
(``benchmarks/README.md``), so engines use it.

**Epochs are explicit.** Ray Data re-executes the pipeline each time a Train worker iterates its shard again,
but it tells a UDF which execution it is in only through a private attribute, which also counts other
executions and restarts at 0 when Train restarts the worker group after a failure (so a resumed run would redo
epoch 0's draws). Instead, a random pipeline reads its epoch from an :class:`EpochClock`, a tiny Ray actor the
Train workers set at the start of each epoch. Every worker calls ``clock.set_epoch(epoch)`` before it starts
iterating; the streaming split starts an execution only when all workers have asked for the next epoch, and
ends one only after every task of it has finished, so all tasks of one execution see the same epoch (the Ray
Train test in ``tests/ltcore/data/test_ingest.py`` fails if a Ray release changes that). A fixed ``int`` works
too, for a pipeline built for one epoch. The draws and augmentations of a row are a function of
``(seed, epoch, row id, copy index)`` alone, so the same seed gives the same epochs (as multisets of rows and
augmented images; which worker gets which row, and the order, depend on timing), whatever the number of workers
or the block layout, and the local iterator gives the same epoch as Ray.

How an engine uses it::

    clock = EpochClock()                                      # driver, after ray.init
    train = build_dataset(manifest_uri, IngestSpec(split="train", views=("weak",), image_size=224, q=0.0,
                                                   seed=0), epoch_source=clock, num_cpus=0.5, normalize=False)
    trainer = TorchTrainer(train_func, train_loop_config={"epoch_clock": clock, ...},
                           datasets={"train": train, "val": build_dataset(manifest_uri, eval_spec)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}))

    def train_func(config):                                   # every worker
        clock = config["epoch_clock"]
        for epoch in range(start_epoch, epochs):              # start_epoch from the checkpoint on resume
            clock.set_epoch(epoch)                            # before iterating, on every rank
            hist = np.zeros(num_classes, np.int64)
            for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
                    batch_size=64, local_shuffle_buffer_size=256, collate_fn=normalize_collate_fn()):
                hist += epoch_histogram(batch["label"], num_classes)
                ...
            # all-reduce hist over ranks: the epoch's class histogram

Ray Data tasks need CPUs besides the Train workers: on a 2-CPU machine give the workers 0.5 CPU each and the
data tasks ``num_cpus=0.5`` (with whole CPUs for two workers no data task can ever be scheduled and the first
epoch waits forever).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ltcore import storage
from ltcore.config import Check, check, check_fields, ge, nonempty
from ltcore.data import sampling
from ltcore.data.manifest import Manifest
from ltcore.data.transforms import IMAGENET_MEAN, IMAGENET_STD, KINDS, build_transform, decode_image, normalize_images

READ_COLUMNS = ["id", "image", "label"]
READ_CPU_SHARE = 0.1  # CPUs of a shard-read task, as a share of a decode task's
_Batch = dict[str, np.ndarray]
# Keys of the per-row random streams derived from (seed, epoch): 0 repeat draws, 1 P x K batches (sampling.py),
# 2 shuffle order, 10 + v the augmentation of view v.
_KEY_PERMUTE = 2
_KEY_VIEW = 10


# ---------------------------------------------------------------------------------------------------------------
# spec and manifest access


@dataclass(frozen=True)
class IngestSpec:
    """What one split's stream looks like. Resources and batch sizes are arguments of the builders, not here."""

    split: str = field(metadata=check(nonempty("split name of the dataset version (train, val, test)")))
    # one transform kind per output image: ("weak", "strong") is two-view
    views: tuple[str, ...] = field(default=("weak",), metadata=check(
        Check(lambda v: 1 <= len(v) <= 2 and all(k in KINDS for k in v), f"one or two of {', '.join(KINDS)}")))
    image_size: int = field(default=224, metadata=check(ge(8)))  # output side S of every view
    # p_j ~ n_j^q (ltcore.data.sampling); None = no class rebalancing, the same as 1
    q: float | None = field(default=None, metadata=check(Check(lambda v: v is None or 0 <= v <= 1,
                                                               "None or in [0, 1]")))
    progressive: bool = False  # instance -> class-balanced over total_epochs (Kang et al.); q is then ignored
    total_epochs: int = field(default=1, metadata=check(ge(1)))  # T of the progressive schedule
    seed: int = field(default=0, metadata=check(ge(0)))
    shuffle: bool = True  # block order + in-block permutation (Ray) or a full permutation (local)
    # expected rows per epoch; None = the split's size N
    epoch_size: int | None = field(default=None, metadata=check(Check(lambda v: v is None or v >= 1,
                                                                      "None or >= 1")))

    def __post_init__(self) -> None:
        check_fields(self, "IngestSpec.", error=ValueError)

    @property
    def policy(self) -> sampling.StreamSampling:
        """The stream's class sampling (q = None samples as q = 1)."""
        return sampling.StreamSampling(q=1.0 if self.q is None else self.q, progressive=self.progressive)

    @property
    def resamples(self) -> bool:
        """Whether rows are repeated/dropped per epoch (rebalancing or a configured epoch size). At q = 1 without
        an epoch size every row is drawn exactly once (``r_i = 1``), so the draws are skipped."""
        return not self.policy.is_identity or self.epoch_size is not None

    @property
    def needs_epoch(self) -> bool:
        """Whether the stream's content depends on the epoch (sampling, or random augmentation; with q = 1 the row
        order within a block still changes with the epoch)."""
        return self.q is not None or self.progressive or self.epoch_size is not None or any(
            v != "test" for v in self.views)

    def probabilities(self, counts: Sequence[int], epoch: int) -> np.ndarray:
        """Class probabilities ``(C,)`` for ``epoch`` (instance-balanced when only ``epoch_size`` is set)."""
        return self.policy.probabilities(counts, epoch, self.total_epochs)


@dataclass(frozen=True)
class _Version:
    classes: tuple[str, ...]
    counts: tuple[int, ...]
    shards: tuple[str, ...]
    image_size: int  # the stored images' shorter side


def _version(manifest: Any, split: str) -> _Version:
    """Classes, counts and shard URIs of ``split`` from a manifest URI, a Manifest, or a manifest dict."""
    if isinstance(manifest, str):
        manifest = Manifest.load(manifest)
    if isinstance(manifest, Mapping):
        classes = tuple(manifest["classes"])
        counts_all, shards_all, size = manifest["counts"], manifest["shards"], int(manifest["image_size"])
    else:
        classes = tuple(manifest.classes)
        counts_all, shards_all, size = manifest.counts, manifest.shards, int(manifest.image_size)
    if split not in shards_all or split not in counts_all:
        raise ValueError(f"dataset version has no split {split!r}; splits: {', '.join(sorted(shards_all))}")
    counts = tuple(int(counts_all[split].get(c, 0)) for c in classes)
    shards = tuple(shards_all[split])
    if not shards or sum(counts) == 0:
        raise ValueError(f"split {split!r} of the dataset version is empty; prepare it with more data")
    return _Version(classes, counts, shards, size)


# ---------------------------------------------------------------------------------------------------------------
# epochs


class EpochClock:
    """The current training epoch, set by the Train workers and read by the ingest tasks (a Ray actor).

    Pickles to its actor handle, so it can go into ``train_loop_config`` and Ray Data UDFs. The actor is owned by
    the process that creates the clock (the driver) and lives as long as it does.
    """

    def __init__(self, epoch: int | None = None) -> None:
        import ray

        self._actor: Any = ray.remote(num_cpus=0)(_ClockState).remote(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Set before iterating the epoch's shard; every rank may call it (same value)."""
        import ray

        if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        ray.get(self._actor.set.remote(int(epoch)))

    def get_epoch(self) -> int:
        import ray

        epoch: Any = ray.get(self._actor.get.remote())
        if epoch is None:
            raise RuntimeError("EpochClock was never set: call clock.set_epoch(epoch) in every Train worker "
                               "before iterating the dataset shard of that epoch")
        return int(epoch)


class _ClockState:
    def __init__(self, epoch: int | None) -> None:
        self.epoch = epoch

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int | None:
        return self.epoch


EpochSource = int | EpochClock


def resolve_epoch(source: EpochSource | None) -> int:
    """The epoch an ingest task works on: a fixed int, or the clock's current value."""
    if source is None:
        raise RuntimeError("this pipeline is random but has no epoch source")  # guarded in build_dataset
    if isinstance(source, EpochClock):
        return source.get_epoch()
    return int(source)


def normalize_batch(batch: Mapping[str, np.ndarray], *, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> dict[str, torch.Tensor]:
    """uint8 ``image``/``image2`` ``(B, 3, S, S)`` -> float32, normalised exactly as the full transform; other
    columns -> tensors. For datasets built with ``normalize=False``; see :func:`normalize_collate_fn`."""
    out = {}
    for k, v in batch.items():
        if k in ("image", "image2") and v.dtype == np.uint8:
            with warnings.catch_warnings():
                # Ray hands out read-only views of its object store; normalising only reads them.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                out[k] = normalize_images(torch.from_numpy(v), mean, std)
        else:
            out[k] = torch.from_numpy(np.array(v))  # small columns: a writable copy
    return out


def normalize_collate_fn(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Any:
    """A Ray ``collate_fn`` applying :func:`normalize_batch` in the consumer's batch-formatting threads.

    Use with ``build_dataset(..., normalize=False)``:
    ``shard.iter_torch_batches(batch_size=64, collate_fn=normalize_collate_fn())`` yields the same float32 batches
    as the default dataset, while Ray moves a quarter of the bytes (uint8 instead of float32 rows).
    """
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _NormalizeCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> Any:
            return normalize_batch(batch, mean=mean, std=std)

    return _NormalizeCollate()


def epoch_histogram(labels: torch.Tensor | np.ndarray | Sequence[int], num_classes: int) -> list[int]:
    """Class histogram ``(C,)`` of the labels seen, e.g. summed over an epoch's batches and then over ranks."""
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.astype(np.int64).ravel()
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    return np.bincount(y, minlength=num_classes).astype(np.int64).tolist()


# ---------------------------------------------------------------------------------------------------------------
# the row-level work shared by the Ray UDFs and the local iterator


def _repeats(ids: Sequence[str], labels: np.ndarray, counts: Sequence[int], spec: IngestSpec, epoch: int) -> np.ndarray:
    """Repeat count of each row for ``epoch``: ``(n,)`` int64 (all ones without resampling)."""
    if not spec.resamples:
        return np.ones(len(labels), np.int64)
    probs = spec.probabilities(counts, epoch)
    return sampling.draw_repeats(labels, counts, probs, spec.seed, epoch, row_keys=sampling.id_keys(ids),
                                 epoch_size=spec.epoch_size)


def _expand(n: int, repeats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row index, copy index) of every output row: ``np.repeat(arange(n), r)`` and 0..r_i-1 within each row."""
    idx = np.repeat(np.arange(n), repeats)
    starts = np.cumsum(repeats) - repeats  # (n,) first output position of each row
    copy = np.arange(idx.size) - np.repeat(starts, repeats)
    return idx, copy


def _shuffle_order(ids: Sequence[str], copies: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A random order of output rows: sort by a per-row key hashed from (seed, epoch, row id, copy index).

    Any subset of rows (a Ray block) is ordered consistently with the whole split (the local iterator), and the
    order does not depend on how rows were grouped.
    """
    return np.argsort(_row_uniforms(ids, copies, seed, epoch, _KEY_PERMUTE), kind="stable")


def _row_uniforms(ids: Sequence[str], copies: np.ndarray, seed: int, epoch: int, key: int) -> np.ndarray:
    keys = sampling.id_keys(ids) ^ (np.asarray(copies).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return sampling.row_uniforms(keys, seed, epoch, key)


def _view_seeds(ids: Sequence[str], copies: np.ndarray, seed: int, epoch: int, view: int) -> np.ndarray:
    """One torch seed per output row and view: a hash of (seed, epoch, view, row id, copy index)."""
    return (_row_uniforms(ids, copies, seed, epoch, _KEY_VIEW + view) * 2**62).astype(np.int64)


class _Augmenter:
    """Decode + transform rows into ``{"image", ["image2"], "label"}`` numpy arrays.

    The per-image transforms stop at uint8; normalisation (``normalize=True``) runs once on the whole batch, which
    gives the same numbers as the full transform (elementwise) at a fraction of the per-image overhead.
    """

    def __init__(self, spec: IngestSpec, *, normalize: bool = True) -> None:
        self.spec, self.normalize = spec, normalize
        self.transforms = [build_transform(v, spec.image_size, normalize=False) for v in spec.views]
        self.random = [v != "test" for v in spec.views]

    def __call__(self, images: Sequence[bytes | torch.Tensor], labels: np.ndarray, ids: Sequence[str],
                 copies: np.ndarray, epoch: int | None) -> dict[str, np.ndarray]:
        n, s = len(images), self.spec.image_size
        outs = [torch.empty((n, 3, s, s), dtype=torch.uint8) for _ in self.transforms]  # (B, 3, S, S) per view
        seeds = [
            _view_seeds(ids, copies, self.spec.seed, epoch, v) if rnd and epoch is not None else None
            for v, rnd in enumerate(self.random)
        ]
        # Seeding torch's generator per row makes each row's augmentation independent of batching; fork_rng leaves
        # the caller's generator as it was.
        with torch.random.fork_rng(devices=[]):
            for i, data in enumerate(images):
                img = data if isinstance(data, torch.Tensor) else decode_image(data)  # cached rows: decoded
                for t, view_seeds, out in zip(self.transforms, seeds, outs):
                    if view_seeds is not None:
                        # the CPU generator only: torch.manual_seed also seeds CUDA, ~80 us per call
                        torch.default_generator.manual_seed(int(view_seeds[i]))
                    out[i] = t(img)
        arrays = [(normalize_images(o) if self.normalize else o).numpy() for o in outs]
        batch = {"image": arrays[0], "label": np.asarray(labels, np.int64)}
        if len(arrays) > 1:
            batch["image2"] = arrays[1]
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Ray Data


def _read_shards(batch: pa.Table, *, spec: IngestSpec, counts: tuple[int, ...], epoch_source: EpochSource | None,
                 s3: storage.S3Options) -> pa.Table:
    """Ray UDF: read the shard(s) named in ``batch["uri"]`` and, when resampling, repeat each row r_i times.

    Output columns ``id``, ``image``, ``label`` and ``rep`` (copy index 0..r_i-1); with ``shuffle`` the rows come in
    a random order, the same order the local iterator gives them.
    """
    return _resample(_read_uris(batch, s3), spec, counts, epoch_source)


def _read_uris(batch: pa.Table, s3: storage.S3Options) -> pa.Table:
    """The rows (:data:`READ_COLUMNS`) of the shard(s) named in ``batch["uri"]``, in that order."""
    return pa.concat_tables([pq.read_table(path, filesystem=fs, columns=READ_COLUMNS)
                             for fs, path in (storage.arrow_fs(u, s3) for u in batch.column("uri").to_pylist())])


def _resample(block: pa.Table, spec: IngestSpec, counts: tuple[int, ...], epoch_source: EpochSource | None
              ) -> pa.Table:
    """The block's rows for the epoch: each repeated r_i times (column ``rep``: copy index), in a random order when
    ``shuffle``."""
    if not spec.resamples and not spec.shuffle:
        return block.append_column("rep", pa.array(np.zeros(block.num_rows, np.int32), pa.int32()))
    idx, copy = _draw(block, spec, counts, resolve_epoch(epoch_source) if spec.needs_epoch else 0)
    return block.take(pa.array(idx, pa.int64())).append_column("rep", pa.array(copy.astype(np.int32), pa.int32()))


def _draw(block: pa.Table, spec: IngestSpec, counts: tuple[int, ...], epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(row index, copy index) of the block's output rows for ``epoch``, shuffled when ``spec.shuffle``. Draws and
    order are functions of (seed, epoch, row id, copy index), whatever rows share the block."""
    ids = block.column("id").to_pylist()
    idx, copy = _expand(block.num_rows, _repeats(ids, block.column("label").to_numpy(), counts, spec, epoch))
    if spec.shuffle and idx.size:
        order = _shuffle_order([ids[i] for i in idx], copy, spec.seed, epoch)
        idx, copy = idx[order], copy[order]
    return idx, copy


def _decode_batch(batch: pa.Table, *, spec: IngestSpec, epoch_source: EpochSource | None,
                  normalize: bool = True) -> dict[str, np.ndarray]:
    """Ray UDF: decode + augment a batch of rows."""
    epoch = resolve_epoch(epoch_source) if spec.needs_epoch else None
    augment = _Augmenter(spec, normalize=normalize)
    return augment(batch.column("image").to_pylist(), batch.column("label").to_numpy(), batch.column("id").to_pylist(),
                   batch.column("rep").to_numpy(), epoch)


def decode_slots(num_cpus: float) -> int:
    """How many decode tasks of ``num_cpus`` CPUs the Ray cluster fits at once (1 without a Ray instance here)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else 1.0
    return max(1, int(cpus // num_cpus)) if num_cpus > 0 else 1


def cut_shards(num_shards: int, num_cpus: float) -> bool:
    """Whether a split of ``num_shards`` shards is cut into smaller blocks before decoding.

    One decode task per shard keeps every decode slot (:func:`decode_slots`) busy when there are at least two
    shards per slot; with fewer, the last tasks of an epoch would run with most CPUs idle.
    """
    return num_shards < 2 * decode_slots(num_cpus)


# ---------------------------------------------------------------------------------------------------------------
# a split decoded once (Ray's object store)

#: The engines cache a split decoded when its size bound fits this share of the cluster's object store.
CACHE_SHARE = 0.25
_ASPECT_BOUND = 2  # the size bound assumes no stored image is more than twice as long as its shorter side


@dataclass(frozen=True)
class DecodedSplit:
    """A split decoded once into Ray's object store, by :func:`decode_split`.

    ``dataset`` is a materialized ``ray.data.Dataset`` of rows ``id``, ``label``, ``pixels`` (the decoded uint8
    ``(3, height, width)`` image as bytes), ``height``, ``width``. Pass it to :func:`build_dataset` as
    ``decoded=``: every epoch then reads it instead of the Parquet shards and skips the JPEG decode, and only the
    draws and the augmentation run per epoch. Its blocks live as long as the process that made it holds it.
    """

    split: str
    dataset: Any
    rows: int
    nbytes: int  # bytes in the object store


def decoded_size_bound(manifest: Any, split: str) -> int:
    """An upper bound on ``split``'s decoded bytes, from the manifest alone: rows x 3 x S x 2S (S = the stored
    shorter side; every image at most 2:1)."""
    v = _version(manifest, split)
    return sum(v.counts) * 3 * v.image_size * v.image_size * _ASPECT_BOUND


def object_store_bytes() -> int:
    """The Ray cluster's object store memory in bytes (0 without a Ray instance here)."""
    import ray

    return int(ray.cluster_resources().get("object_store_memory", 0)) if ray.is_initialized() else 0


def decode_split(manifest: Any, split: str, *, num_cpus: float = 1.0, s3: storage.S3Options | None = None
                 ) -> DecodedSplit:
    """Read and decode every image of ``split`` once and keep the decoded rows in Ray's object store.

    One task per shard; the decoded rows are then cut into a multiple of the decode slots (:func:`decode_slots`),
    at least two blocks per slot, so that each epoch's augmentation tasks keep every slot busy to the end (21
    shards on 2 slots: 22 blocks, not 21 with the last one running alone). Blocks until the split is decoded.
    """
    import ray.data

    version = _version(manifest, split)
    ds: Any = ray.data.from_items([{"uri": u} for u in version.shards], override_num_blocks=len(version.shards))
    ds = ds.map_batches(_read_decode_shards, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus,
                        fn_kwargs={"s3": (s3 or storage.S3Options()).resolved()})
    blocks = _decoded_blocks(len(version.shards), decode_slots(num_cpus))
    if blocks != len(version.shards):
        ds = ds.repartition(blocks)
    ds = ds.materialize()
    return DecodedSplit(split, ds, int(ds.count()), int(ds.size_bytes()))


def _decoded_blocks(shards: int, slots: int) -> int:
    """Blocks of a decoded split: the shard count rounded up to a multiple of ``slots``, at least ``2 x slots``."""
    return max(2 * slots, -(-shards // slots) * slots)


def _read_decode_shards(batch: pa.Table, *, s3: storage.S3Options) -> pa.Table:
    """Ray UDF: the shard(s) named in ``batch["uri"]`` decoded: ``id``, ``label``, ``pixels``, ``height``, ``width``."""
    block = _read_uris(batch, s3)
    images = [decode_image(data) for data in block.column("image").to_pylist()]  # each (3, H, W) uint8
    return pa.table({
        "id": block.column("id"), "label": block.column("label"),
        "pixels": pa.array([img.numpy().tobytes() for img in images], pa.large_binary()),
        "height": pa.array([img.shape[1] for img in images], pa.int32()),
        "width": pa.array([img.shape[2] for img in images], pa.int32()),
    })


def _decoded_images(part: pa.Table) -> list[torch.Tensor]:
    """The ``(3, H, W)`` uint8 images of decoded rows (writable copies of the object store's bytes)."""
    col = part.column("pixels").combine_chunks()
    if len(col) == 0:
        return []
    offsets = np.frombuffer(col.buffers()[1], np.int64)[col.offset : col.offset + len(col) + 1]
    data = np.frombuffer(col.buffers()[2], np.uint8)
    hs, ws = part.column("height").to_numpy(), part.column("width").to_numpy()
    return [torch.from_numpy(data[offsets[i] : offsets[i + 1]].copy()).view(3, int(hs[i]), int(ws[i]))
            for i in range(len(col))]


def _augment_decoded(block: pa.Table, *, spec: IngestSpec, counts: tuple[int, ...],
                     epoch_source: EpochSource | None, normalize: bool, batch_size: int) -> Iterator[_Batch]:
    """Ray UDF over a decoded block: the epoch's draws and order, then the augmentation, ``batch_size`` rows at a
    time (the same rows and images as the streaming path)."""
    epoch = resolve_epoch(epoch_source) if spec.needs_epoch else None
    idx, copy = _draw(block, spec, counts, 0 if epoch is None else epoch)
    augment = _Augmenter(spec, normalize=normalize)
    for start in range(0, idx.size, batch_size):
        part = block.take(pa.array(idx[start : start + batch_size], pa.int64()))
        yield augment(_decoded_images(part), part.column("label").to_numpy(), part.column("id").to_pylist(),
                      copy[start : start + batch_size], epoch)


def build_dataset(
    manifest: Any,
    spec: IngestSpec,
    *,
    epoch_source: EpochSource | None = None,
    num_cpus: float = 1.0,
    decode_batch_size: int = 128,
    s3: storage.S3Options | None = None,
    normalize: bool = True,
    cut: bool | None = None,
    decoded: DecodedSplit | None = None,
) -> Any:
    """The split as a ``ray.data.Dataset`` of rows ``image`` ``(3, S, S)`` [, ``image2``], ``label`` int64.

    Args:
        manifest: a dataset version: manifest URI, :class:`~ltcore.data.manifest.Manifest`, or its dict.
        spec: views, sampling and shuffling (:class:`IngestSpec`).
        epoch_source: where tasks learn the epoch: an :class:`EpochClock` (Ray Train: workers set it each
            epoch) or a fixed ``int``. Required when the stream is random (resampling or non-test views).
        num_cpus: CPUs per decode task (read tasks take ``READ_CPU_SHARE`` of it). Fractions let data tasks run
            beside Train workers.
        decode_batch_size: rows per decode batch inside a task, and the block size a split with few shards is cut
            into (:func:`cut_shards`); 128 measured best at 224 px on 2 CPUs.
        s3: S3 endpoint/credentials for ``s3://`` shards; default: the process-wide ones.
        normalize: True: float32 normalised images. False: uint8 images after all random steps; the consumer
            normalises them (``collate_fn=normalize_collate_fn()``), giving the same float32 batches.
        cut: cut shards into ``decode_batch_size``-row blocks before decoding: None decides by
            :func:`cut_shards` (the number of shards against the cluster's decode slots); True/False force it.
        decoded: the split already decoded (:func:`decode_split`): every epoch reads it instead of the shards and
            only draws and augments (the same rows and images). ``cut`` does not apply.

    Returns:
        A lazy ``ray.data.Dataset``; each execution (each epoch a Train worker iterates its shard) re-draws.

    Raises:
        ValueError: the split does not exist or is empty; a random stream without an epoch source.
    """
    import ray.data

    if spec.needs_epoch and epoch_source is None:
        raise ValueError(f"split {spec.split!r} with views {spec.views} and q={spec.q} changes every epoch: pass "
                         "epoch_source=EpochClock() (set by the Train workers each epoch) or a fixed int epoch")
    if not isinstance(epoch_source, EpochClock | int | None) or isinstance(epoch_source, bool):
        raise ValueError(f"epoch_source must be an EpochClock, an int or None, got {type(epoch_source).__name__}")
    version = _version(manifest, spec.split)
    if decoded is not None:
        return _from_decoded(decoded, spec, version, epoch_source=epoch_source, num_cpus=num_cpus,
                             batch_size=decode_batch_size, normalize=normalize)
    # One block per shard URI, read by our own task: read_parquet would list the files again in every epoch (a
    # task of ~1 s here) and pack small shards into one read task.
    ds: Any = ray.data.from_items([{"uri": u} for u in version.shards], override_num_blocks=len(version.shards))
    if spec.shuffle:
        # A new shard order every execution, reproducible from the seed and the execution count (public API).
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=spec.seed, reseed_after_execution=True))
    # S3 settings resolved here, so that tasks use the driver's endpoint whatever their environment holds.
    read_kwargs = {"spec": spec, "counts": version.counts, "epoch_source": epoch_source,
                   "s3": (s3 or storage.S3Options()).resolved()}
    if cut_shards(len(version.shards), num_cpus) if cut is None else cut:
        # Too few shards for the decode slots: read them with whole decode-task CPUs and cut them into decode-sized
        # blocks. The streaming repartition costs throughput (benchmarks/README.md), so splits with enough shards
        # skip it.
        ds = ds.map_batches(_read_shards, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus,
                            fn_kwargs=read_kwargs)
        ds = _cut_with_cpus(ds.repartition(target_num_rows_per_block=decode_batch_size), num_cpus)
    else:
        # One decode task per shard. Read tasks take a small CPU share (cheap work, or waiting on object storage; a
        # whole CPU would keep a decode task off it) and are capped at one per decode slot: uncapped, that share
        # lets Ray start a worker process per shard at the start of an epoch (seen: 8-10 processes on 2 CPUs).
        ds = ds.map_batches(_read_shards, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus * READ_CPU_SHARE,
                            compute=ray.data.TaskPoolStrategy(size=min(decode_slots(num_cpus), len(version.shards))),
                            fn_kwargs=read_kwargs)
    return ds.map_batches(_decode_batch, batch_size=decode_batch_size, batch_format="pyarrow", num_cpus=num_cpus,
                          fn_kwargs={"spec": spec, "epoch_source": epoch_source, "normalize": normalize},
                          udf_modifying_row_count=False)


def _cut_with_cpus(ds: Any, num_cpus: float) -> Any:
    """Give the streaming repartition just added to ``ds`` the decode tasks' CPUs.

    ``Dataset.repartition`` takes no resource arguments, so its tasks ask for Ray's default of one whole CPU. On a
    cluster where no node has a whole CPU left beside the Train workers (2 workers of 0.5 CPU on two 1-CPU nodes)
    they never start, and the workers wait for the split forever. Ray's planner reads the operator's
    ``ray_remote_args`` (Ray 2.60, as pinned in pyproject.toml); another layout is an error, not a silent hang.
    """
    op: Any = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    if type(op).__name__ != "StreamingRepartition" or not isinstance(getattr(op, "ray_remote_args", None), dict):
        raise RuntimeError(f"ltcore.data.ingest: this Ray version's repartition ({type(op).__name__}) has no "
                           "ray_remote_args to set; use the Ray version pinned in pyproject.toml")
    object.__setattr__(op, "ray_remote_args", {**op.ray_remote_args, "num_cpus": num_cpus})  # a frozen dataclass
    return ds


def _from_decoded(decoded: DecodedSplit, spec: IngestSpec, version: _Version, *, epoch_source: EpochSource | None,
                  num_cpus: float, batch_size: int, normalize: bool) -> Any:
    import ray.data

    if decoded.split != spec.split:
        raise ValueError(f"decoded= holds split {decoded.split!r}, but the spec asks for {spec.split!r}")
    ds = decoded.dataset
    if spec.shuffle:
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=spec.seed, reseed_after_execution=True))
    return ds.map_batches(_augment_decoded, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus,
                          fn_kwargs={"spec": spec, "counts": version.counts, "epoch_source": epoch_source,
                                     "normalize": normalize, "batch_size": batch_size})


# ---------------------------------------------------------------------------------------------------------------
# single process


def _read_split(version: _Version, columns: list[str], s3: storage.S3Options | None) -> Iterator[pa.Table]:
    for uri in version.shards:
        fs, path = storage.arrow_fs(uri, s3)
        try:
            yield pq.read_table(path, filesystem=fs, columns=columns)
        except FileNotFoundError:
            raise storage.StorageError(f"shard {uri!r} of split {version!r} does not exist; the dataset version "
                                       "is incomplete, prepare it again") from None


def planned_draws(manifest: Any, spec: IngestSpec, epoch: int, *,
                  s3: storage.S3Options | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(ids (n,), labels (n,), repeats (n,))`` of the whole split for ``epoch``, from the id and label columns.

    What :func:`build_dataset` and :func:`iter_epoch_local` will emit in that epoch (as a multiset), computed
    without touching the images; ``np.bincount(labels, weights=repeats)`` is the epoch's class histogram.
    """
    version = _version(manifest, spec.split)
    ids: list[str] = []
    labels = []
    for t in _read_split(version, ["id", "label"], s3):
        ids.extend(t.column("id").to_pylist())
        labels.append(t.column("label").to_numpy())
    y = np.concatenate(labels).astype(np.int64)
    return ids, y, _repeats(ids, y, version.counts, spec, epoch)


def iter_epoch_local(
    manifest: Any,
    spec: IngestSpec,
    epoch: int,
    batch_size: int,
    *,
    histogram: np.ndarray | None = None,
    drop_last: bool = False,
    s3: storage.S3Options | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of the split in this process (no Ray): the same draws and augmentations as :func:`build_dataset`.

    Args:
        manifest: manifest URI, Manifest or manifest dict.
        spec: the stream (:class:`IngestSpec`).
        epoch: the epoch to draw.
        batch_size: rows per yielded batch.
        histogram: optional ``(C,)`` int64 array; each yielded batch's labels are added to it, so after the loop
            it holds the epoch's class histogram.
        drop_last: drop a last batch smaller than ``batch_size``.
        s3: S3 endpoint/credentials for ``s3://`` shards.

    Yields:
        ``{"image": (B, 3, S, S) float32, ["image2": (B, 3, S, S)], "label": (B,) int64}`` torch tensors.
        With ``shuffle`` the whole split is loaded and permuted (memory = the split's encoded size); without it,
        shards are streamed in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    version = _version(manifest, spec.split)
    if histogram is not None and histogram.shape != (len(version.classes),):
        raise ValueError(f"histogram must have shape ({len(version.classes)},), got {histogram.shape}")
    augment = _Augmenter(spec)
    aug_epoch = int(epoch) if spec.needs_epoch else None

    def rows() -> Iterator[tuple[pa.Table, np.ndarray, np.ndarray]]:
        tables = _read_split(version, READ_COLUMNS, s3)
        if spec.shuffle:
            tables = iter([pa.concat_tables(list(tables))])
        for t in tables:
            idx, copy = _draw(t, spec, version.counts, int(epoch))
            yield t, idx, copy

    pending: list[_Batch] = []
    n_pending = 0
    for t, idx, copy in rows():
        for start in range(0, idx.size, batch_size):
            take = pa.array(idx[start : start + batch_size], pa.int64())
            part = t.take(take)
            out = augment(part.column("image").to_pylist(), part.column("label").to_numpy(),
                          part.column("id").to_pylist(), copy[start : start + batch_size], aug_epoch)
            pending.append(out)
            n_pending += part.num_rows
            while n_pending >= batch_size:
                batch, pending, n_pending = _cut(pending, batch_size)
                yield _emit(batch, histogram)
    if n_pending and not drop_last:
        batch, pending, n_pending = _cut(pending, n_pending)
        yield _emit(batch, histogram)


def _cut(parts: list[_Batch], size: int) -> tuple[_Batch, list[_Batch], int]:
    """First ``size`` rows of the concatenated parts, and the rest."""
    whole = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    head = {k: v[:size] for k, v in whole.items()}
    rest = {k: v[size:] for k, v in whole.items()}
    n_rest = len(rest["label"])
    return head, ([rest] if n_rest else []), n_rest


def _emit(batch: dict[str, np.ndarray], histogram: np.ndarray | None) -> dict[str, torch.Tensor]:
    if histogram is not None:
        histogram += np.bincount(batch["label"], minlength=histogram.size)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


__all__ = [
    "CACHE_SHARE",
    "DecodedSplit",
    "EpochClock",
    "IngestSpec",
    "build_dataset",
    "cut_shards",
    "decode_slots",
    "decode_split",
    "decoded_size_bound",
    "epoch_histogram",
    "iter_epoch_local",
    "object_store_bytes",
    "planned_draws",
    "resolve_epoch",
]
