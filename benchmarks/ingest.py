"""Ingest throughput on HAM10000: torch DataLoader vs ltcore ingest (Ray Data), plain and class-rebalanced.

All readers use the same dataset version (Parquet shards of encoded JPEGs written by ``prepare_dataset``), decode
the same bytes and apply the same transform (``build_transform(kind, 224)``), and hand the consumer float32
``(B, 3, 224, 224)`` batches:

- ``dataloader``: ``torch.utils.data.DataLoader`` over the rows read from the shards into memory, ``--cpus``
  persistent worker processes, shuffled.
- ``ltcore``: ``build_dataset(normalize=False)`` without resampling: Ray Data moves uint8 rows and the
  consumer's collate threads normalise them (``iter_torch_batches(collate_fn=normalize_collate_fn(),
  local_shuffle_buffer_size=...)``), the setting engines use; Ray with ``--cpus`` CPUs.
- ``ltcore_q0``: the same with class-balanced resampling (q = 0), re-drawn every epoch.
- ``ltcore_f32``: ``build_dataset()`` with its default float32 rows (normalised in the decode tasks); same output.
- ``ltcore_cut``: ``ltcore`` with the shards always cut into decode-sized blocks (``build_dataset(cut=True)``), the
  layout a split with too few shards for the CPUs gets.
- ``ltcore_cached``: the split decoded once into Ray's object store (``decode_split``, before the warm-up; its
  time is reported apart) and ``build_dataset(decoded=..., normalize=False)``: per epoch only the draws, the
  shuffle and the transform run, on the same rows and images. The engines' default when the split fits
  (``train.cache_decoded=auto``).
- ``ltcore_cached_q0``: the same, class-balanced (q = 0).

Protocol: every reader is built once and runs one warm-up epoch (process start, imports); then ``--rounds``
rounds each run one epoch of every reader, in a rotating order, so that load from other processes on a shared
machine falls on all readers alike. Per epoch we record images delivered, wall time, and the busy CPU time of the
machine (``/proc/stat``: this process, Ray's raylet and workers, DataLoader workers): images/s is contended
throughput; CPU ms per image is what the reader costs while nothing else runs. The medians over rounds are
reported, with ratios of the medians. Results go to ``benchmarks/results/ingest.json``; a markdown table is
printed.

    python benchmarks/ingest.py                                  # all 10,015 images, 2 CPUs, weak transform
    python benchmarks/ingest.py --breakdown                      # + where the ltcore epoch spends its time
    python benchmarks/ingest.py --images 500 --rounds 2          # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per decode process, as in the Ray tasks

import numpy as np
import pyarrow.parquet as pq
import torch

from ltcore import storage
from ltcore.data.ingest import EpochClock, IngestSpec, build_dataset, decode_split, normalize_collate_fn
from ltcore.data.manifest import Manifest
from ltcore.data.transforms import build_transform, decode_image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ham10000"
READERS = ("dataloader", "ltcore", "ltcore_q0", "ltcore_f32", "ltcore_cut", "ltcore_cached", "ltcore_cached_q0")
_TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------------------
# dataset version


def prepare_version(data: Path, images: int, work: Path) -> str:
    """A dataset version of ``images`` HAM10000 images (0: all), all in train, at their native 150 px shorter side."""
    from ltcore.config import DataConfig, SourceConfig, SplitConfig
    from ltcore.data.prepare import prepare_dataset

    cfg = DataConfig(
        name="ham10000-bench",
        source=SourceConfig(kind="table", table=str(data / "HAM10000_metadata.csv"), image_root=str(data / "images"),
                            id_column="image_id", path_template="{id}.jpg", label_column="dx",
                            group_column="lesion_id"),
        output=str(work / "datasets"),
        image_size=150,  # the files are 200 x 150: kept at that size; the transforms resize to 224
        split=SplitConfig(train=1.0, val=0.0, test=0.0),
        limit=images,
        rows_per_shard=500,
    )
    uri, _ = prepare_dataset(cfg, progress=True)
    return uri


# ---------------------------------------------------------------------------------------------------------------
# readers: each is a function epoch -> iterable of batches


class ParquetRows(torch.utils.data.Dataset):
    """The train split's rows held in memory (encoded bytes), decoded and transformed per item."""

    def __init__(self, manifest: Manifest, kind: str, image_size: int) -> None:
        self.images: list[bytes] = []
        labels = []
        for uri in manifest.shards["train"]:
            fs, path = storage.arrow_fs(uri)
            t = pq.read_table(path, filesystem=fs, columns=["image", "label"])
            self.images.extend(t.column("image").to_pylist())
            labels.append(t.column("label").to_numpy())
        self.labels = np.concatenate(labels).astype(np.int64)
        self.transform = build_transform(kind, image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.transform(decode_image(self.images[i])), "label": int(self.labels[i])}


def make_readers(uri: str, args: argparse.Namespace) -> dict[str, Callable[[int], Iterable[dict[str, Any]]]]:
    loader = torch.utils.data.DataLoader(ParquetRows(Manifest.load(uri), args.kind, args.image_size),
                                         batch_size=args.batch_size, shuffle=True, num_workers=args.cpus,
                                         persistent_workers=True, generator=torch.Generator().manual_seed(0))
    readers: dict[str, Callable[[int], Iterable[dict[str, Any]]]] = {"dataloader": lambda epoch: loader}

    t0 = time.perf_counter()
    decoded = decode_split(uri, "train", num_cpus=1.0)
    args.decode_once_s = time.perf_counter() - t0  # recorded with the protocol
    args.decoded_mib = decoded.nbytes / 2**20
    print(f"train split decoded once: {decoded.rows} images, {args.decoded_mib:.0f} MiB in the object store, "
          f"{args.decode_once_s:.1f} s", flush=True)

    def ltcore_reader(q: float | None, normalize: bool, cut: bool | None = None, cached: bool = False
                      ) -> Callable[[int], Iterable[dict[str, Any]]]:
        clock = EpochClock()
        spec = IngestSpec(split="train", views=(args.kind,), image_size=args.image_size, q=q, seed=0, shuffle=True)
        ds = build_dataset(uri, spec, epoch_source=clock, num_cpus=1.0, decode_batch_size=args.decode_batch_size,
                           normalize=normalize, cut=cut, decoded=decoded if cached else None)

        def epoch_batches(epoch: int) -> Iterable[dict[str, Any]]:
            clock.set_epoch(epoch)
            return ds.iter_torch_batches(batch_size=args.batch_size, local_shuffle_buffer_size=args.shuffle_buffer,
                                         collate_fn=None if normalize else normalize_collate_fn())

        return epoch_batches

    readers["ltcore"] = ltcore_reader(None, False)
    readers["ltcore_q0"] = ltcore_reader(0.0, False)
    readers["ltcore_f32"] = ltcore_reader(None, True)
    readers["ltcore_cut"] = ltcore_reader(None, False, cut=True)
    readers["ltcore_cached"] = ltcore_reader(None, False, cached=True)
    readers["ltcore_cached_q0"] = ltcore_reader(0.0, False, cached=True)
    if args.breakdown:
        readers |= breakdown_readers(uri, args)
    return readers


def breakdown_readers(uri: str, args: argparse.Namespace) -> dict[str, Callable[[int], Iterable[dict[str, Any]]]]:
    """The plain ltcore reader cut after each step, to see where an epoch's time goes (``--breakdown``).

    ``read``: the shard-read tasks of ``build_dataset`` alone (rows of encoded bytes, shuffled per shard);
    ``decoded``: the whole ``build_dataset``
    (uint8 rows) consumed with ``iter_batches`` (no torch conversion, no normalisation); ``torch``: +
    ``iter_torch_batches`` with the normalising collate, no shuffle buffer. The ``ltcore`` reader adds the
    consumer's local shuffle buffer to that.
    """
    import ray.data

    from ltcore.data import ingest

    clock = EpochClock()
    spec = IngestSpec(split="train", views=(args.kind,), image_size=args.image_size, q=None, seed=0, shuffle=True)
    version = ingest._version(uri, "train")
    read_kwargs = {"spec": spec, "counts": version.counts, "epoch_source": clock,
                   "s3": storage.S3Options().resolved()}
    read = ray.data.from_items([{"uri": u} for u in version.shards], override_num_blocks=len(version.shards))
    read = read.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=0, reseed_after_execution=True))
    read = read.map_batches(ingest._read_shards, batch_size=None, batch_format="pyarrow",
                            num_cpus=ingest.READ_CPU_SHARE, fn_kwargs=read_kwargs)
    full = build_dataset(uri, spec, epoch_source=clock, num_cpus=1.0, decode_batch_size=args.decode_batch_size,
                         normalize=False)

    def reader(make: Callable[[], Iterable[Any]]) -> Callable[[int], Iterable[dict[str, Any]]]:
        def epoch_batches(epoch: int) -> Iterable[dict[str, Any]]:
            clock.set_epoch(epoch)
            return ({"label": b["label"]} for b in make())

        return epoch_batches

    return {
        "read": reader(lambda: read.iter_batches(batch_size=args.batch_size, batch_format="pyarrow")),
        "decoded": reader(lambda: full.iter_batches(batch_size=args.batch_size)),
        "torch": lambda epoch: (clock.set_epoch(epoch), full.iter_torch_batches(
            batch_size=args.batch_size, collate_fn=normalize_collate_fn()))[1],
    }


# ---------------------------------------------------------------------------------------------------------------
# measurement


def machine_cpu_seconds() -> float:
    """Busy CPU time of the whole machine so far (user, nice, system, irq, softirq, steal), from /proc/stat.

    Machine-wide rather than per process tree: Ray starts and reaps worker processes during an epoch, and a process
    that exits between two readings would take its CPU time out of a tree's total (negative readings were seen).
    Anything else running counts too; the load average printed per epoch shows when that was the case.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def time_epoch(batches: Iterable[dict[str, Any]], epoch: int) -> dict[str, float]:
    c0, t0 = machine_cpu_seconds(), time.perf_counter()
    n, first = 0, None
    for batch in batches:
        assert "image" not in batch or batch["image"].dtype == torch.float32
        if first is None:
            first = time.perf_counter() - t0
        n += len(batch["label"])
    wall = time.perf_counter() - t0
    cpu = machine_cpu_seconds() - c0
    return {"epoch": epoch, "images": n, "seconds": wall, "images_per_s": n / wall, "cpu_s": cpu,
            "cpu_ms_per_image": 1000 * cpu / n, "first_batch_s": first}


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HAM10000 folder (metadata CSV + images/)")
    p.add_argument("--images", type=int, default=0,
                   help="images in the benchmark's dataset version (stratified subset); 0 = all 10,015")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--kind", choices=["weak", "strong", "test"], default="weak", help="transform of every reader")
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs and DataLoader workers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--decode-batch-size", type=int, default=128, help="rows per Ray decode task")
    p.add_argument("--shuffle-buffer", type=int, default=256, help="ltcore local shuffle buffer (rows)")
    p.add_argument("--rounds", type=int, default=5, help="timed epochs per reader, interleaved across readers")
    p.add_argument("--work-dir", type=Path, default=None, help="where the dataset version goes (default: temp)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the ltcore reader cut after each step (read, decode, torch)")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "ingest.json")
    args = p.parse_args(argv)
    if not (args.data / "HAM10000_metadata.csv").exists():
        sys.exit(f"HAM10000 not found at {args.data}: pass --data with the folder holding HAM10000_metadata.csv")

    import ray

    # address="local": a fresh instance even when a `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    with tempfile.TemporaryDirectory() as tmp:
        uri = prepare_version(args.data, args.images, args.work_dir or Path(tmp))
        manifest = Manifest.load(uri)
        n = manifest.num_rows("train")
        counts = dict(zip(manifest.classes, manifest.class_counts("train")))
        print(f"dataset version: {n} train images, classes {counts}", flush=True)
        readers = make_readers(uri, args)
        names = tuple(readers)
        epochs: dict[str, list[dict[str, float]]] = {k: [] for k in names}
        for name, reader in readers.items():  # warm-up: epoch 0, not counted
            warm = time_epoch(reader(0), 0)
            print(f"warm-up {name:>10}: {warm['images']} images in {warm['seconds']:.1f} s", flush=True)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                e = time_epoch(readers[name](r + 1), r + 1)
                epochs[name].append(e)
                print(f"round {r + 1} {name:>10}: {e['images_per_s']:6.0f} images/s, {e['cpu_ms_per_image']:5.2f} "
                      f"CPU ms/image, first batch {e['first_batch_s']:.2f} s ({e['images']} images, "
                      f"{e['seconds']:.2f} s, load {os.getloadavg()[0]:.1f})", flush=True)
        del readers
    ray.shutdown()

    rate = {k: statistics.median(e["images_per_s"] for e in v) for k, v in epochs.items()}
    cost = {k: statistics.median(e["cpu_ms_per_image"] for e in v) for k, v in epochs.items()}
    first = {k: statistics.median(e["first_batch_s"] for e in v) for k, v in epochs.items()}
    result = {
        "protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_images": n,
        "machine": {"cpus_visible": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "images_per_s": rate,
        "cpu_ms_per_image": cost,
        "first_batch_s": first,
        "ratio_ltcore_over_dataloader": rate["ltcore"] / rate["dataloader"],
        "ratio_rebalanced_over_plain": rate["ltcore_q0"] / rate["ltcore"],
        "ratio_ltcore_f32_over_dataloader": rate["ltcore_f32"] / rate["dataloader"],
        "ratio_ltcore_cut_over_dataloader": rate["ltcore_cut"] / rate["dataloader"],
        "cpu_ratio_dataloader_over_ltcore": cost["dataloader"] / cost["ltcore"],
        "ratio_ltcore_cached_over_dataloader": rate["ltcore_cached"] / rate["dataloader"],
        "ratio_cached_rebalanced_over_plain": rate["ltcore_cached_q0"] / rate["ltcore_cached"],
        "cpu_ratio_dataloader_over_ltcore_cached": cost["dataloader"] / cost["ltcore_cached"],
        "targets": {"ltcore_over_dataloader": 1.0, "rebalanced_over_plain": 0.95},
        "epochs": epochs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"HAM10000, {n} images, {args.image_size} px, '{args.kind}' transform, {args.cpus} CPUs, batch "
          f"{args.batch_size}; medians of {args.rounds} interleaved epochs per reader")
    print()
    print("| reader | images/s | CPU ms / image | first batch s | ratio |")
    print("|---|---:|---:|---:|---|")
    rows = [
        ("dataloader", f"torch DataLoader ({args.cpus} workers)", "1.00"),
        ("ltcore", "ltcore ingest (Ray Data; uint8 rows, consumer normalises)",
         f"{result['ratio_ltcore_over_dataloader']:.2f} vs DataLoader (target >= 1.0)"),
        ("ltcore_q0", "ltcore ingest, class-balanced (q=0)",
         f"{result['ratio_rebalanced_over_plain']:.2f} vs plain ltcore (target >= 0.95)"),
        ("ltcore_f32", "ltcore ingest, float32 rows (build_dataset default)",
         f"{result['ratio_ltcore_f32_over_dataloader']:.2f} vs DataLoader"),
        ("ltcore_cut", "ltcore ingest, shards cut into decode-sized blocks (cut=True)",
         f"{result['ratio_ltcore_cut_over_dataloader']:.2f} vs DataLoader"),
        ("ltcore_cached", "ltcore ingest, decoded once (decoded=; engine default when it fits)",
         f"{result['ratio_ltcore_cached_over_dataloader']:.2f} vs DataLoader (target >= 1.0)"),
        ("ltcore_cached_q0", "ltcore ingest, decoded once, class-balanced (q=0)",
         f"{result['ratio_cached_rebalanced_over_plain']:.2f} vs decoded-once plain (target >= 0.95)"),
    ]
    rows += [(k, f"breakdown: {k}", f"{rate['dataloader'] / rate[k]:.2f}x the DataLoader's epoch time")
             for k in names if k not in READERS]
    for key, label, ratio in rows:
        print(f"| {label} | {rate[key]:.0f} | {cost[key]:.2f} | {first[key]:.2f} | {ratio} |")
    print(f"\nthe cached readers' split was decoded once before the warm-up: {args.decode_once_s:.1f} s, "
          f"{args.decoded_mib:.0f} MiB in the object store (not in their epochs)")
    print(f"\nwritten to {args.output}")
    return result


if __name__ == "__main__":
    main()
