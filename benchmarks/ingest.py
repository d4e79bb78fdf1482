"""Ingest throughput on HAM10000: torch DataLoader vs ltcore ingest (Ray Data), plain and class-rebalanced.

All three read the same dataset version (Parquet shards of encoded JPEGs, written by ``prepare_dataset``), decode
the same bytes and apply the same transform (``build_transform(kind, 224)``) to float32 (3, 224, 224) batches:

- ``dataloader``: ``torch.utils.data.DataLoader`` over the rows read from the Parquet shards into memory,
  ``num_workers`` worker processes (persistent), shuffled, batch ``--batch-size``.
- ``ltcore``: ``build_dataset`` (no resampling) iterated with ``iter_torch_batches`` and a local shuffle buffer,
  Ray started with ``--cpus`` CPUs.
- ``ltcore_q0``: the same with class-balanced resampling (q = 0), re-drawn every epoch.

Each runs one warm-up epoch (worker start-up, imports) and then ``--epochs`` timed epochs; images/s is images
delivered to the consumer divided by the time from the first request to the last batch. ``--rounds`` repeats
the three in turn and the median round counts, which evens out load from other processes. Results go to
``benchmarks/results/ingest.json`` and a markdown table is printed.

    python benchmarks/ingest.py                      # 2,000 images, 2 CPUs, weak transform
    python benchmarks/ingest.py --images 500 --rounds 1 --epochs 1   # smoke
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
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per decode process, as in the Ray tasks

import numpy as np
import pyarrow.parquet as pq
import torch

from ltcore import storage
from ltcore.data.ingest import EpochClock, IngestSpec, build_dataset
from ltcore.data.manifest import Manifest
from ltcore.data.transforms import build_transform, decode_image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ham10000"


# ---------------------------------------------------------------------------------------------------------------
# dataset version


def prepare_version(data: Path, images: int, work: Path) -> str:
    """A dataset version of ``images`` HAM10000 images, all in the train split, at their native 150 px shorter side."""
    from ltcore.config import DataConfig, SourceConfig, SplitConfig
    from ltcore.data.prepare import prepare_dataset

    cfg = DataConfig(
        name="ham10000-bench",
        source=SourceConfig(kind="table", table=str(data / "HAM10000_metadata.csv"), image_root=str(data / "images"),
                            id_column="image_id", path_template="{id}.jpg", label_column="dx",
                            group_column="lesion_id"),
        output=str(work / "datasets"),
        image_size=150,  # the files are 200 x 150: stored as they are; the transforms resize to 224
        split=SplitConfig(train=1.0, val=0.0, test=0.0),
        limit=images,
        rows_per_shard=500,
    )
    uri, _ = prepare_dataset(cfg, progress=True)
    return uri


# ---------------------------------------------------------------------------------------------------------------
# the three readers


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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(decode_image(self.images[i])), int(self.labels[i])


def run_dataloader(manifest: Manifest, args: argparse.Namespace) -> list[dict[str, float]]:
    ds = ParquetRows(manifest, args.kind, args.image_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.cpus,
                                         persistent_workers=True, generator=torch.Generator().manual_seed(0))
    return [_time_epoch(iter(loader), lambda b: b[0].shape[0], e) for e in range(args.epochs + 1)]


def run_ltcore(uri: str, args: argparse.Namespace, q: float | None) -> list[dict[str, float]]:
    clock = EpochClock()
    spec = IngestSpec(split="train", views=(args.kind,), image_size=args.image_size, q=q, seed=0, shuffle=True)
    ds = build_dataset(uri, spec, epoch_source=clock, num_cpus=1.0, decode_batch_size=args.decode_batch_size)
    out = []
    for epoch in range(args.epochs + 1):
        clock.set_epoch(epoch)
        batches = ds.iter_torch_batches(batch_size=args.batch_size, local_shuffle_buffer_size=args.shuffle_buffer)
        out.append(_time_epoch(iter(batches), lambda b: b["image"].shape[0], epoch))
    return out


def _time_epoch(it: Any, size: Any, epoch: int) -> dict[str, float]:
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += int(size(batch))
    dt = time.perf_counter() - t0
    return {"epoch": epoch, "images": n, "seconds": dt, "images_per_s": n / dt}


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HAM10000 folder (metadata CSV + images/)")
    p.add_argument("--images", type=int, default=2000, help="images in the benchmark's dataset version")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--kind", choices=["weak", "strong", "test"], default="weak", help="transform of every reader")
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs and DataLoader workers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--decode-batch-size", type=int, default=32, help="rows per Ray decode task batch")
    p.add_argument("--shuffle-buffer", type=int, default=256, help="ltcore local shuffle buffer (rows)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per reader (after one warm-up epoch)")
    p.add_argument("--rounds", type=int, default=2, help="times the three readers run in turn; median counts")
    p.add_argument("--work-dir", type=Path, default=None, help="where the dataset version goes (default: temp)")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "ingest.json")
    args = p.parse_args(argv)
    if not (args.data / "HAM10000_metadata.csv").exists():
        sys.exit(f"HAM10000 not found at {args.data}: pass --data with the folder holding HAM10000_metadata.csv")

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        uri = prepare_version(args.data, args.images, work)
        manifest = Manifest.load(uri)
        n = manifest.num_rows("train")
        counts = dict(zip(manifest.classes, manifest.class_counts("train")))
        print(f"dataset version: {n} train images, classes {counts}")
        rounds: dict[str, list[float]] = {"dataloader": [], "ltcore": [], "ltcore_q0": []}
        epochs: dict[str, list[list[dict[str, float]]]] = {k: [] for k in rounds}
        for r in range(args.rounds):
            for name in rounds:
                if name == "dataloader":
                    res = run_dataloader(manifest, args)
                else:
                    res = run_ltcore(uri, args, 0.0 if name == "ltcore_q0" else None)
                timed = res[1:]  # epoch 0 is the warm-up
                rate = sum(e["images"] for e in timed) / sum(e["seconds"] for e in timed)
                rounds[name].append(rate)
                epochs[name].append(res)
                per_epoch = ", ".join(f"{e['images']} in {e['seconds']:.2f} s" for e in res)
                print(f"round {r + 1} {name:>10}: {rate:7.1f} images/s  (epochs: {per_epoch})", flush=True)
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in rounds.items()}
    result = {
        "protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_images": n,
        "machine": {"cpus_visible": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "images_per_s": med,
        "images_per_s_rounds": rounds,
        "epochs": epochs,
        "ratio_ltcore_over_dataloader": med["ltcore"] / med["dataloader"],
        "ratio_rebalanced_over_plain": med["ltcore_q0"] / med["ltcore"],
        "targets": {"ltcore_over_dataloader": 1.0, "rebalanced_over_plain": 0.95},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"HAM10000, {n} images, {args.image_size} px, '{args.kind}' transform, {args.cpus} CPUs, "
          f"batch {args.batch_size}, median of {args.rounds} rounds x {args.epochs} epochs")
    print()
    print("| reader | images/s | ratio |")
    print("|---|---:|---:|")
    print(f"| torch DataLoader ({args.cpus} workers) | {med['dataloader']:.0f} | 1.00 |")
    print(f"| ltcore ingest (Ray Data) | {med['ltcore']:.0f} | {result['ratio_ltcore_over_dataloader']:.2f} "
          "vs DataLoader (target >= 1.0) |")
    print(f"| ltcore ingest, class-balanced (q=0) | {med['ltcore_q0']:.0f} | "
          f"{result['ratio_rebalanced_over_plain']:.2f} vs plain (target >= 0.95) |")
    print(f"\nwritten to {args.output}")
    return result


if __name__ == "__main__":
    main()
