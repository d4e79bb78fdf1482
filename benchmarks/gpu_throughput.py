"""GPU training throughput: ResNet-50 at 224 px, bf16, channels_last, fed by ltcore ingest; and GPU utilisation.

    python benchmarks/gpu_throughput.py                                   # all of HAM10000, batch 256, 200 steps
    python benchmarks/gpu_throughput.py --images 2048 --steps 40 --warmup 10   # a quick look

Run from the repository root (``ltcore/configs/ham10000.yaml`` finds the data at ``../shared/data/ham10000``).
Target on one H100: >= 2,500 images/s end to end. It needs a CUDA device; on a machine without one it prints
one line, writes nothing and exits 0.

Protocol. One dataset version from ``ham10000.yaml`` at ``--image-size`` (224) px shorter side
(``data.limit=--images``, 0 = all 10,015 images), its train split. One process, no Ray Train: the split as a
Ray Data dataset from :func:`ltcore.data.ingest.build_dataset` (the ``weak`` view, instance sampling, shuffled;
read -> [repartition, for splits with few shards] -> decode + transform in Ray tasks of ``--data-cpus`` CPUs each,
as many in parallel as the local Ray's CPUs allow), consumed with ``Dataset.iter_torch_batches(batch_size=...,
device="cuda", prefetch_batches=..., local_shuffle_buffer_size=...)`` straight into the training step. Epochs as in
training: an :class:`~ltcore.data.ingest.EpochClock` is set before each pass over the split and each pass is a new
Ray Data execution, so the timed window includes the epoch boundaries it crosses (``--epoch-size`` streams that many
rows per pass instead, to measure steady state). With ``--ingest-dtype uint8`` (default) the Ray tasks ship
uint8 images (a quarter of the bytes) and the step normalises them on the GPU (``normalize_images``, the
transform's last op); ``float32`` ships the transform's normalised output as the Train loops consume it now.

The step: ``build_model(backbone="resnet50")`` (no pretrained weights), channels_last, ``torch.autocast`` bf16,
cross-entropy, SGD (momentum 0.9, Nesterov, weight decay 5e-4), batch ``--batch-size`` (256), ``--warmup`` steps
untimed, then ``--steps`` timed steps; images/s = steps x batch / wall time between two
``torch.cuda.synchronize()``. The same model on synthetic tensors already on the GPU gives the compute ceiling.
GPU utilisation is sampled every 0.5 s during each timed window, with ``torch.cuda.utilization()`` (needs
``pynvml``) or else ``nvidia-smi --query-gpu=utilization.gpu``; it is NVML's "a kernel was running" fraction,
not a measure of how busy the SMs are. Results go to ``benchmarks/results/gpu_throughput.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ltcore import storage  # noqa: E402
from ltcore.config import load_config  # noqa: E402
from ltcore.data.transforms import normalize_images  # noqa: E402
from ltcore.models import build_model  # noqa: E402

TARGET_IMAGES_PER_S = 2500.0
NO_CUDA = "gpu_throughput: no CUDA device on this machine; nothing measured"


# ---------------------------------------------------------------------------------------------------------------
# GPU utilisation


def utilization_reader(device: torch.device) -> tuple[Callable[[], float] | None, str]:
    """A function returning the GPU's utilisation in percent, and what it uses (``none`` if nothing works)."""
    try:
        torch.cuda.utilization(device)  # ModuleNotFoundError without pynvml
        return (lambda: float(torch.cuda.utilization(device))), "torch.cuda.utilization (pynvml)"
    except Exception:  # no pynvml, or NVML not usable: try nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "none"
    # nvidia-smi numbers GPUs ignoring CUDA_VISIBLE_DEVICES; a UUID names the one torch uses either way.
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    target = f"GPU-{uuid}" if uuid is not None else str(device.index or 0)
    cmd = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", target]

    def read() -> float:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
        return float(out.strip().splitlines()[0])

    try:
        read()
    except Exception:
        return None, "none"
    return read, "nvidia-smi"


class UtilizationSampler:
    """Samples a reader every ``interval`` seconds in a background thread between ``start()`` and ``stop()``."""

    def __init__(self, read: Callable[[], float] | None, interval: float = 0.5) -> None:
        self.read, self.interval = read, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a failed sample is skipped, not fatal
                self.samples.append(self.read())  # type: ignore[misc]

    def start(self) -> None:
        self.samples = []
        self._stop.clear()
        if self.read is not None:
            self._thread = threading.Thread(target=self._loop, name="gpu-util", daemon=True)
            self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        n = len(self.samples)
        return {"gpu_util_mean": sum(self.samples) / n if n else None, "gpu_util_samples": n}


# ---------------------------------------------------------------------------------------------------------------
# training step and timing


class Trainer:
    """ResNet-50 (or ``backbone``) training steps: channels_last, bf16 autocast, CE, SGD."""

    def __init__(self, num_classes: int, backbone: str, lr: float, device: torch.device) -> None:
        self.device = device
        self.model = build_model(num_classes=num_classes, backbone=backbone, pretrained="none").to(device)
        self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        self.criterion = nn.CrossEntropyLoss()

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) uint8 or float32 on the GPU, labels (B,) int64; returns the loss (no sync)."""
        if images.dtype == torch.uint8:
            images = normalize_images(images)  # (B, 3, S, S) float32, the transform's last op, on the GPU
        x = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = self.model(x)["logits"]  # (B, C)
        loss = self.criterion(logits.float(), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def timed_run(trainer: Trainer, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], warmup: int, steps: int,
              batch_size: int, sampler: UtilizationSampler, name: str,
              passes: list[int] | None = None) -> dict[str, Any]:
    """``warmup`` untimed steps, then ``steps`` timed ones; images/s, host time waiting for data, utilisation.

    ``passes``: the list the batch generator appends to when it starts a pass over the data; the result then
    says how many passes started inside the timed window (each is a Ray Data start-up the step may wait on).
    """
    for i in range(warmup):
        trainer.step(*next(batches))
        if i == 0:
            print(f"[{name}] first step done", flush=True)
    torch.cuda.synchronize()
    passes_before = len(passes or [])
    sampler.start()
    wait = 0.0
    t0 = time.perf_counter()
    loss = torch.zeros((), device=trainer.device)
    for i in range(steps):
        tw = time.perf_counter()
        x, y = next(batches)
        wait += time.perf_counter() - tw
        loss = trainer.step(x, y)
        if (i + 1) % max(1, steps // 4) == 0:
            print(f"[{name}] step {i + 1}/{steps} ({time.perf_counter() - t0:.1f} s)", flush=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    util = sampler.stop()
    out = {"steps": steps, "images": steps * batch_size, "seconds": dt, "images_per_s": steps * batch_size / dt,
           "host_wait_for_data_s": wait, "last_loss": float(loss), **util}
    if passes is not None:
        out["passes_started_in_window"] = len(passes) - passes_before
    gu = "-" if util["gpu_util_mean"] is None else f"{util['gpu_util_mean']:.0f}%"
    print(f"[{name}] {out['images_per_s']:.0f} images/s over {steps} steps ({dt:.1f} s), GPU utilisation {gu}, "
          f"host waited {wait:.1f} s for data", flush=True)
    return out


def synthetic_batches(batch_size: int, size: int, num_classes: int,
                      device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    while True:
        yield x, y


def ingest_batches(ds: Any, clock: Any, args: argparse.Namespace, device: torch.device,
                   epochs: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from the Ray Data dataset, epoch after epoch (the clock set before each pass, as in training)."""
    for epoch in itertools.count():
        clock.set_epoch(epoch)
        epochs.append(epoch)
        for batch in ds.iter_torch_batches(batch_size=args.batch_size, device=str(device),
                                           prefetch_batches=args.prefetch_batches, drop_last=True,
                                           local_shuffle_buffer_size=args.shuffle_buffer or None,
                                           pin_memory=args.pin_memory):
            yield batch["image"], batch["label"]


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "ltcore", "configs", "ham10000.yaml"))
    p.add_argument("--images", type=int, default=0, help="data.limit: images in the dataset version, 0 = all")
    p.add_argument("--image-size", type=int, default=224, help="data.image_size and the trained side")
    p.add_argument("--work-dir", default="./ltcore-runs/bench-datasets", help="data.output: where the version goes")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=200, help="timed steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (cuDNN autotuning, pipeline start)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all; ignored with "
                   "RAY_ADDRESS)")
    p.add_argument("--data-cpus", type=float, default=1.0, help="CPUs per Ray Data read/decode task")
    p.add_argument("--decode-batch-size", type=int, default=32, help="rows per decode task batch")
    p.add_argument("--prefetch-batches", type=int, default=4)
    p.add_argument("--shuffle-buffer", type=int, default=256, help="local shuffle buffer rows (0 = none)")
    p.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ingest-dtype", choices=["uint8", "float32"], default="uint8",
                   help="what the Ray tasks ship: uint8 (normalised on the GPU) or the normalised float32")
    p.add_argument("--epoch-size", type=int, default=0, help="rows per pass (IngestSpec.epoch_size); 0 = the split")
    p.add_argument("--out", default=os.path.join(HERE, "results", "gpu_throughput.json"))
    p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. data.source.table=... (data elsewhere)")
    args = p.parse_args()

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0

    from ltcore.cli import init_ray
    from ltcore.data.ingest import EpochClock, IngestSpec, build_dataset
    from ltcore.data.manifest import Manifest
    from ltcore.data.prepare import prepare_dataset

    t_start = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cudnn.benchmark = True
    read, util_source = utilization_reader(device)
    sampler = UtilizationSampler(read)
    gpu = torch.cuda.get_device_name(device)
    print(f"[bench] {gpu}; GPU utilisation from {util_source}", flush=True)

    cfg = load_config(args.config, [f"data.limit={args.images}", f"data.image_size={args.image_size}",
                                    f"data.output={args.work_dir}", *args.overrides])
    init_ray(num_cpus=args.cpus)
    import ray

    manifest_uri, _ = prepare_dataset(cfg.data)
    manifest = Manifest.load(manifest_uri)
    n_train, size, classes = manifest.num_rows("train"), manifest.image_size, len(manifest.classes)
    print(f"[bench] dataset {manifest_uri}: {n_train} train images at {size} px; {args.backbone}, batch "
          f"{args.batch_size}, {args.warmup} + {args.steps} steps", flush=True)

    trainer = Trainer(classes, args.backbone, args.lr, device)
    print("[bench] synthetic tensors on the GPU (compute ceiling)", flush=True)
    synthetic = timed_run(trainer, synthetic_batches(args.batch_size, size, classes, device), args.warmup,
                          args.steps, args.batch_size, sampler, "synthetic")

    trainer = Trainer(classes, args.backbone, args.lr, device)  # fresh weights and optimiser state
    spec = IngestSpec(split="train", views=("weak",), image_size=size, q=None, seed=cfg.train.seed, shuffle=True,
                      epoch_size=args.epoch_size or None)
    clock = EpochClock()
    ds = build_dataset(manifest_uri, spec, epoch_source=clock, num_cpus=args.data_cpus,
                       decode_batch_size=args.decode_batch_size, normalize=args.ingest_dtype == "float32")
    epochs: list[int] = []
    print(f"[bench] ltcore ingest -> GPU ({args.ingest_dtype} images, {args.data_cpus:g} CPU per data task, "
          f"{ray.cluster_resources().get('CPU', 0):g} Ray CPUs)", flush=True)
    batches = ingest_batches(ds, clock, args, device, epochs)
    ingest = timed_run(trainer, batches, args.warmup, args.steps, args.batch_size, sampler, "ingest", epochs)
    batches.close()  # ends the Ray Data execution in flight
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30

    result = {
        "protocol": {"dataset": manifest_uri, "dataset_hash": manifest.hash, "train_images": n_train,
                     "image_size": size, "backbone": args.backbone, "pretrained": "none", "precision": "bf16 autocast",
                     "memory_format": "channels_last", "batch_size": args.batch_size, "warmup_steps": args.warmup,
                     "timed_steps": args.steps, "transform": "weak", "sampling": "instance",
                     "ingest_dtype": args.ingest_dtype, "data_cpus_per_task": args.data_cpus,
                     "decode_batch_size": args.decode_batch_size, "prefetch_batches": args.prefetch_batches,
                     "shuffle_buffer": args.shuffle_buffer, "pin_memory": args.pin_memory,
                     "epoch_size": args.epoch_size or n_train, "utilisation_source": util_source,
                     "overrides": list(args.overrides)},
        "machine": {"gpu": gpu, "cpus_visible": os.cpu_count(), "ray_cluster_cpus": ray.cluster_resources().get("CPU"),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "ray": ray.__version__, "peak_gpu_memory_gib": peak_mem},
        "synthetic": synthetic,
        "ingest": ingest,
        "ingest_over_synthetic": ingest["images_per_s"] / synthetic["images_per_s"],
        "target_images_per_s": TARGET_IMAGES_PER_S,
        "meets_target": ingest["images_per_s"] >= TARGET_IMAGES_PER_S,
        "total_s": time.perf_counter() - t_start,
    }
    storage.write_json(args.out, result)

    def util(r: dict[str, Any]) -> str:
        return "-" if r["gpu_util_mean"] is None else f"{r['gpu_util_mean']:.0f}%"

    print(f"\n{gpu}, {args.backbone} at {size} px, bf16, channels_last, batch {args.batch_size}, "
          f"{args.steps} timed steps\n")
    print("| input | images/s | GPU utilisation | host wait for data s |")
    print("|---|---:|---:|---:|")
    print(f"| synthetic tensors on the GPU | {synthetic['images_per_s']:.0f} | {util(synthetic)} | - |")
    print(f"| ltcore ingest (Ray Data, {args.ingest_dtype}) | {ingest['images_per_s']:.0f} | {util(ingest)} "
          f"| {ingest['host_wait_for_data_s']:.1f} |")
    verdict = "meets" if result["meets_target"] else "misses"
    print(f"\nend to end {ingest['images_per_s']:.0f} images/s = {result['ingest_over_synthetic']:.2f} of the ceiling; "
          f"{verdict} the target >= {TARGET_IMAGES_PER_S:.0f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
