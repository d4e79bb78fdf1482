"""Training overhead: epoch time of a plain torch loop vs ltcore on Ray Train (1 and 2 workers), in one run.

    python benchmarks/train_overhead.py                          # 2,048 HAM10000 images at 64 px, 2 epochs
    python benchmarks/train_overhead.py --images 128 --epochs 2  # smoke

Run from the repository root (``ltcore/configs/ham10000.yaml`` finds the data at ``../shared/data/ham10000``).
Target: 1-worker Ray Train epoch <= 1.10x the plain loop's.

Protocol. One dataset version from ``ham10000.yaml`` (``data.limit=--images``, ``data.image_size=--image-size``,
written under ``--work-dir``); its train split, ``resnet18`` (no pretrained weights), batch 64, SGD (the config's
lr, momentum, weight decay, Nesterov, as the ltcore loop builds it), cross-entropy, the ``weak`` transform,
instance sampling (every row once per epoch, shuffled), on CPU, one torch thread per training process. Ray is
started once with ``--cpus`` CPUs and the three runs go one after another in this process:

- ``plain``: ``torch.utils.data.DataLoader`` with one (persistent) worker process over the split's rows read from
  the Parquet shards (encoded bytes in memory), ``decode_image`` + ``build_transform("weak", S)`` per item,
  ``shuffle=True``, no pinning; the loop is forward, CE, backward, SGD step. ``torch.set_num_threads(1)``.
- ``ray1``: ``ltcore.engine.trainer.run_stage1`` with 1 worker x 1 CPU and Ray Data tasks of 0.5 CPU.
- ``ray2``: the same with 2 workers x 0.5 CPU (DDP over gloo).

Epoch time is the mean over epochs after the first (the first pays start-up: worker processes, imports,
Ray Data's first execution). For Ray Train it is the loop's own per-epoch ``train_time_s`` (rank 0), read for
every epoch from ``Result.metrics_dataframe`` (Ray Train v2 keeps the metrics of the kept checkpoints, so the
runs keep one checkpoint per epoch).

What the ratio includes: on the ltcore side, Ray Data ingest (per-epoch re-execution of read -> [repartition] ->
decode + transform in Ray tasks, the streaming split to the workers, the 256-row local shuffle buffer), the
EpochClock call, Ray Train's worker loop (one tiny all-reduce per step to keep ranks in step, DDP with 2
workers, per-step bookkeeping); on the plain side, the DataLoader and the bare loop. Both epoch times exclude
what comes after the epoch's last optimiser step: ltcore's per-epoch validation and checkpoint, and Ray Train's
start-up (the ``fit_s`` column shows whole runs). The decode side differs in degree of parallelism, as in real
use: the DataLoader has one worker process, Ray Data runs as many 0.5-CPU tasks as the free CPUs allow.
Results go to ``benchmarks/results/train_overhead.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ltcore import storage  # noqa: E402
from ltcore.config import Config, load_config, replace  # noqa: E402
from ltcore.data.manifest import Manifest  # noqa: E402
from ltcore.data.transforms import build_transform, decode_image  # noqa: E402
from ltcore.models import build_model  # noqa: E402

TARGET_RAY1_OVER_PLAIN = 1.10


# ---------------------------------------------------------------------------------------------------------------
# (a) the plain loop


class ParquetRows(torch.utils.data.Dataset):
    """A split's rows held in memory as encoded bytes; decoded and transformed per item -> ((3, S, S), label)."""

    def __init__(self, shards: list[str], kind: str, image_size: int) -> None:
        self.images: list[bytes] = []
        labels = []
        for uri in shards:
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


def run_plain(cfg: Config, manifest: Manifest) -> list[dict[str, float]]:
    """Per-epoch ``{"epoch", "images", "train_time_s"}`` of the plain DataLoader + torch loop."""
    s1 = cfg.stage1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray Train worker has 1 CPU, so 1 OpenMP thread
    try:
        torch.manual_seed(cfg.train.seed)
        data = ParquetRows(manifest.shards["train"], s1.augment, manifest.image_size)
        loader = torch.utils.data.DataLoader(data, batch_size=s1.batch_size, shuffle=True, num_workers=1,
                                             pin_memory=False, persistent_workers=True,
                                             generator=torch.Generator().manual_seed(cfg.train.seed))
        model = build_model(num_classes=len(manifest.classes), backbone=cfg.model.backbone, pretrained="none",
                            head=cfg.model.head, cosine_scale=cfg.model.cosine_scale)
        # the optimiser ltcore's stage-1 loop builds for optimizer=sgd
        opt = torch.optim.SGD(model.parameters(), lr=s1.lr, momentum=s1.momentum, weight_decay=s1.weight_decay,
                              nesterov=True)
        criterion = nn.CrossEntropyLoss()
        out = []
        for epoch in range(s1.epochs):
            model.train()
            t0 = time.perf_counter()
            n, loss_sum = 0, 0.0
            for x, y in loader:
                loss = criterion(model(x)["logits"], y)  # x (B, 3, S, S), logits (B, C), y (B,)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n += int(y.shape[0])
                loss_sum += float(loss.detach()) * int(y.shape[0])
            dt = time.perf_counter() - t0
            out.append({"epoch": epoch, "images": n, "train_time_s": dt, "train_loss": loss_sum / max(1, n)})
            print(f"[plain] epoch {epoch + 1}/{s1.epochs} loss {loss_sum / max(1, n):.4f} "
                  f"({dt:.1f} s, {n / dt:.0f} img/s)", flush=True)
        del loader  # stops the persistent worker
        return out
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# (b), (c) ltcore on Ray Train


def run_ray(cfg: Config, manifest_uri: str, manifest: Manifest, storage_root: str) -> tuple[list[dict], float]:
    """Per-epoch metrics of one stage-1 Ray Train run, and the run's wall time (``fit``) in seconds."""
    from ltcore.engine.runs import new_run_id
    from ltcore.engine.trainer import run_stage1

    run_uri = storage.join(storage.normalize(storage_root), "runs", f"overhead-{cfg.train.num_workers}w-{new_run_id()}")
    t0 = time.perf_counter()
    result = run_stage1(cfg, manifest_uri, manifest, run_uri)
    fit_s = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"Ray Train run {run_uri} failed: {result.error}")
    df = result.metrics_dataframe
    if df is None or "train_time_s" not in df:
        raise RuntimeError(f"Ray Train run {run_uri} reported no per-epoch metrics")
    keep = ["epoch", "train_images", "train_time_s", "train_loss"]
    rows = df[keep].sort_values("epoch").to_dict("records")
    epochs = [{"epoch": int(r["epoch"]), "images": int(r["train_images"]), "train_time_s": float(r["train_time_s"]),
               "train_loss": float(r["train_loss"])} for r in rows]
    if len(epochs) != cfg.stage1.epochs:
        raise RuntimeError(f"expected {cfg.stage1.epochs} epochs of metrics from {run_uri}, got {len(epochs)}")
    return epochs, fit_s


def ray_worker_threads() -> int:
    """torch's thread count in a 1-CPU Ray actor (what the 1-worker Train worker gets), to check the protocol."""
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def threads(self) -> int:
            return torch.get_num_threads()

    probe = Probe.remote()  # type: ignore[attr-defined]
    n = int(ray.get(probe.threads.remote()))
    ray.kill(probe)
    return n


# ---------------------------------------------------------------------------------------------------------------


def summarize(epochs: list[dict[str, float]]) -> dict[str, float]:
    warm = epochs[1:] or epochs  # the first epoch is warm-up; with --epochs 1 it is all there is
    secs = float(np.mean([e["train_time_s"] for e in warm]))
    imgs = float(np.mean([e["images"] for e in warm]))
    return {"epoch_s": secs, "images_per_epoch": imgs, "images_per_s": imgs / secs, "timed_epochs": len(warm)}


def table(rows: dict[str, dict[str, Any]]) -> str:
    plain = rows["plain"]["epoch_s"]
    lines = ["| run | epoch s | images/epoch | images/s | ratio to plain | fit s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        fit = "-" if r.get("fit_s") is None else f"{r['fit_s']:.1f}"
        lines.append(f"| {r['label']} | {r['epoch_s']:.2f} | {r['images_per_epoch']:.0f} | {r['images_per_s']:.1f} "
                     f"| {r['epoch_s'] / plain:.2f} | {fit} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "ltcore", "configs", "ham10000.yaml"))
    p.add_argument("--images", type=int, default=2048, help="data.limit: images in the dataset version (all splits)")
    p.add_argument("--image-size", type=int, default=64, help="data.image_size: stored and trained side")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the first is warm-up, not timed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray started here (ignored with RAY_ADDRESS)")
    p.add_argument("--work-dir", default="./ltcore-runs/bench-datasets", help="data.output: where the version goes")
    p.add_argument("--storage", default="./ltcore-runs/bench-overhead", help="train.storage: where the runs go")
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_overhead.json"))
    p.add_argument("overrides", nargs="*", help="extra config overrides for all three runs")
    args = p.parse_args()
    if args.epochs < 2:
        print("note: with --epochs 1 the only epoch is the warm-up one; timings include start-up", flush=True)

    from ltcore.cli import init_ray
    from ltcore.data.prepare import prepare_dataset
    from ltcore.engine.pipeline import validate

    cfg = load_config(args.config, [
        f"data.limit={args.images}", f"data.image_size={args.image_size}", f"data.output={args.work_dir}",
        f"model.backbone={args.backbone}", "model.pretrained=none", "model.head=linear",
        "stage1.method=ce", f"stage1.epochs={args.epochs}", f"stage1.batch_size={args.batch_size}",
        "stage1.optimizer=sgd", "stage1.q=1.0", "stage1.progressive=false", "stage1.pk_classes=0",
        "stage1.augment=weak", "stage1.loss.label_smoothing=0.0", "stage1.loss.spmix=false", "stage2.method=none",
        "train.use_gpu='no'", "train.data_cpus=0.5", "train.max_steps_per_epoch=0", f"train.storage={args.storage}",
        # Ray Train v2's Result holds the metrics of the kept checkpoints only: keep one per epoch
        f"train.keep_checkpoints={args.epochs}", "train.max_failures=0", *args.overrides])
    validate(cfg)

    t_start = time.perf_counter()
    init_ray(num_cpus=args.cpus)
    import ray

    manifest_uri, _ = prepare_dataset(cfg.data)
    manifest = Manifest.load(manifest_uri)
    validate(cfg, manifest)
    n_train = manifest.num_rows("train")
    print(f"[bench] dataset {manifest_uri}: {n_train} train images at {manifest.image_size} px; "
          f"{args.backbone}, batch {args.batch_size}, {args.epochs} epochs per run", flush=True)
    threads = ray_worker_threads()
    print(f"[bench] torch threads in a 1-CPU Ray actor: {threads}", flush=True)

    rows: dict[str, dict[str, Any]] = {}
    epochs: dict[str, list] = {}
    print("[bench] (a) plain torch loop, DataLoader with 1 worker process", flush=True)
    epochs["plain"] = run_plain(cfg, manifest)
    rows["plain"] = {"label": "plain torch loop (DataLoader, 1 worker)", **summarize(epochs["plain"]), "fit_s": None}
    for name, workers, cpus in (("ray1", 1, 1.0), ("ray2", 2, 0.5)):
        print(f"[bench] ({'b' if workers == 1 else 'c'}) ltcore on Ray Train, {workers} worker(s) x {cpus:g} CPU",
              flush=True)
        run_cfg = replace(cfg, **{"train.num_workers": workers, "train.cpus_per_worker": cpus})
        epochs[name], fit_s = run_ray(run_cfg, manifest_uri, manifest, args.storage)
        rows[name] = {"label": f"ltcore on Ray Train, {workers} worker(s) x {cpus:g} CPU", **summarize(epochs[name]),
                      "fit_s": fit_s}
    for r in rows.values():
        r["ratio_to_plain"] = r["epoch_s"] / rows["plain"]["epoch_s"]

    result = {
        "protocol": {"dataset": manifest_uri, "dataset_hash": manifest.hash, "train_images": n_train,
                     "image_size": manifest.image_size, "backbone": args.backbone, "pretrained": "none",
                     "batch_size": args.batch_size, "epochs": args.epochs, "timed_epochs": "all after the first",
                     "optimizer": {k: getattr(cfg.stage1, k) for k in ("optimizer", "lr", "momentum", "weight_decay")},
                     "transform": cfg.stage1.augment, "sampling": "instance", "ray_cpus": args.cpus,
                     "data_cpus_per_task": cfg.train.data_cpus, "shuffle_buffer": cfg.train.shuffle_buffer,
                     "overrides": list(args.overrides)},
        "machine": {"cpus_visible": os.cpu_count(), "ray_cluster_cpus": ray.cluster_resources().get("CPU"),
                    "ray_actor_torch_threads": threads, "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "rows": rows,
        "epochs": epochs,
        "ratio_ray1_over_plain": rows["ray1"]["ratio_to_plain"],
        "ratio_ray2_over_plain": rows["ray2"]["ratio_to_plain"],
        "target_ray1_over_plain": TARGET_RAY1_OVER_PLAIN,
        "meets_target": rows["ray1"]["ratio_to_plain"] <= TARGET_RAY1_OVER_PLAIN,
        "total_s": time.perf_counter() - t_start,
    }
    storage.write_json(args.out, result)
    print(f"\nHAM10000 train split, {n_train} images at {manifest.image_size} px, {args.backbone}, batch "
          f"{args.batch_size}, CPU; epoch seconds = mean of epochs 2..{args.epochs}\n")
    print(table(rows))
    r1 = rows["ray1"]["ratio_to_plain"]
    verdict = "meets" if r1 <= TARGET_RAY1_OVER_PLAIN else "misses"
    print(f"\n1-worker Ray Train / plain = {r1:.2f} ({verdict} the target <= {TARGET_RAY1_OVER_PLAIN:.2f}); "
          f"2 workers / plain = {rows['ray2']['ratio_to_plain']:.2f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
