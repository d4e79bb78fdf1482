"""What every Ray Train worker loop is made of, and what a Tune trial, retraining and prediction reuse.

Building the model from a config, loading a checkpoint into it, the batches of a dataset shard, predictions
gathered across workers, metrics, saving a checkpoint and reporting it, rank-0 log lines.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from ltcore import logs
from ltcore.config import Config
from ltcore.data.transforms import normalize_images
from ltcore.engine import checkpoint as ckpt
from ltcore.engine import dist
from ltcore.eval.metrics import compute_metrics
from ltcore.methods.recipes import Stage1Recipe, build_stage1
from ltcore.models import LTModel, build_model
from ltcore.raystart import quiet_ray_loggers

logger = logging.getLogger("ltcore.engine")




def model_meta(cfg: Config, classes: list[str], model: LTModel, stage: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "backbone": cfg.model.backbone,
        "classes": list(classes),
        "head": cfg.model.head,
        "cosine_scale": cfg.model.cosine_scale,
        "feat_dim": model.feat_dim,
        "proj_dim": (model.projector is not None and cfg.model.proj_dim) or 0,
        "aux_binary": model.aux_head is not None,
        "method": cfg.stage1.method if stage == "stage1" else cfg.stage2.method,
    }


def make_model(cfg: Config, num_classes: int, recipe: Stage1Recipe | None, pretrained: bool = True) -> LTModel:
    proj = cfg.model.proj_dim if recipe is not None and recipe.needs_projector else 0
    aux = bool(recipe is not None and recipe.needs_aux_binary)
    return build_model(num_classes=num_classes, backbone=cfg.model.backbone,
                       pretrained=cfg.model.pretrained if pretrained else "none",
                       head=cfg.model.head, proj_dim=proj, aux_binary=aux, cosine_scale=cfg.model.cosine_scale)


class TrainModule(nn.Module):
    """The model and the recipe's own modules (prototypes, projectors, teachers) as one module.

    DDP wraps this, so the recipe's learnable parameters are all-reduced like the model's. ``forward`` is the
    model's; recipes reach their modules through their own references.
    """

    def __init__(self, model: LTModel, extra: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


def unwrap(model: nn.Module) -> LTModel:
    """The LTModel inside a DDP and/or TrainModule wrapper."""
    inner: Any = model.module if hasattr(model, "module") else model
    if isinstance(inner, TrainModule):
        inner = inner.model
    return inner  # type: ignore[no-any-return]


def autocast(device: torch.device) -> Any:
    # bf16 autocast on CUDA only: CPU autocast is slower than fp32 on most CPUs.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a batch to ``device``; uint8 image batches ``(B, 3, H, W)`` (the engine's datasets) are normalised
    there, after the copy (4x fewer bytes to move than float32)."""
    out = {}
    for k, v in batch.items():
        t = torch.as_tensor(v).to(device, non_blocking=True)
        if t.ndim == 4 and t.dtype == torch.uint8:
            t = normalize_images(t)
        if t.ndim == 4 and device.type == "cuda":
            t = t.contiguous(memory_format=torch.channels_last)
        out[k] = t
    return out


def iter_shard(name: str, batch_size: int, shuffle_buffer: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    shard = ray.train.get_dataset_shard(name)
    kw: dict[str, Any] = {"batch_size": batch_size}
    if shuffle_buffer:
        kw["local_shuffle_buffer_size"] = shuffle_buffer
    yield from shard.iter_torch_batches(**kw)


def train_batches(cfg: Config, recipe: Stage1Recipe, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of training batches: the instance (or rebalanced) stream, P x K batches, or that stream
    zipped with a class-balanced tail stream (SPMix: keys ``tail_image``, ``tail_image2``, ``tail_label``)."""
    s1 = cfg.stage1
    stream = iter_shard("train", s1.batch_size, cfg.train.shuffle_buffer)
    if s1.pk_classes > 0:
        from ltcore.methods.pk import PKBatcher

        batcher = PKBatcher(s1.pk_classes, max(1, s1.batch_size // s1.pk_classes), seed=cfg.train.seed)
        batcher.set_epoch(epoch)
        stream = batcher(stream)
    if recipe.needs_tail_stream:
        tail = iter_shard("tail", s1.batch_size, cfg.train.shuffle_buffer)
        stream = ({**h, **{f"tail_{k}": v for k, v in t.items()}} for h, t in zip(stream, tail))
    yield from lockstep(stream)


def lockstep(batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches while every rank still has one: DDP and the recipes' gathers need equal step counts.

    Streams can differ by a batch across ranks (P x K batching, a zipped tail stream); one tiny all-reduce per
    step keeps the ranks in step, and what a rank has left is drained (not trained on) so that the epoch's
    Ray Data execution completes.
    """
    it = iter(batches)
    while True:
        batch = next(it, None)
        if dist.all_reduce_sum(np.array([0.0 if batch is None else 1.0]))[0] < dist.world_size():
            break
        yield batch  # type: ignore[misc]
    for _ in it:
        pass


@torch.no_grad()
def predict_shard(model: nn.Module, name: str, batch_size: int, device: torch.device,
                  features: bool = False) -> tuple[np.ndarray, ...]:
    """(probs (N, C), labels (N,) [, features (N, D)]) of this worker's part of a split, gathered on all ranks."""
    model.eval()
    net = unwrap(model)
    probs, labels, feats = [], [], []
    for batch in iter_shard(name, batch_size):
        batch = to_device(batch, device)
        with autocast(device):
            f = net.forward_features(batch["image"])
            logits = net.classify(f)
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
        if features:
            feats.append(f.float().cpu().numpy())
    c = net.num_classes
    p = np.concatenate(probs) if probs else np.zeros((0, c), np.float32)
    y = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    if features:
        d = np.concatenate(feats) if feats else np.zeros((0, net.feat_dim), np.float32)
        return dist.gather_arrays(p, y, d)
    return dist.gather_arrays(p, y)


def eval_metrics(cfg: Config, probs: np.ndarray, labels: np.ndarray, classes: list[str], counts: list[int]) -> dict:
    return compute_metrics(labels, probs, classes, counts, group_rule=cfg.eval.group_rule,
                           many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold,
                           ece_bins=cfg.eval.ece_bins)


def log(msg: str) -> None:
    """One line from the first worker (the others stay quiet: no line is printed once per worker)."""
    if dist.is_main():
        logger.info(msg)


class Progress:
    """Within-epoch progress lines from the first worker, at most one per ``every_s`` seconds (0: none)."""

    def __init__(self, tag: str, every_s: float) -> None:
        self.tag, self.every_s = tag, every_s
        self.t0 = self.last = time.perf_counter()
        self.steps, self.images, self.loss_sum = 0, 0, 0.0

    def step(self, images: int, loss: float) -> None:
        self.steps += 1
        self.images += images
        self.loss_sum += loss * images
        now = time.perf_counter()
        if self.every_s > 0 and now - self.last >= self.every_s:
            self.last = now
            log(f"{self.tag} step {self.steps}: {self.images} images on this worker, "
                 f"{self.images / (now - self.t0):.0f} img/s, mean loss {self.loss_sum / max(1, self.images):.4f}")


class PhaseTimer:
    """Seconds per phase of an epoch (``data_wait``, ``forward_backward``, ``optimizer``, ...), summed over steps.

    Plain ``time.perf_counter()`` around each phase, with no synchronisation added: on CPU every phase's time is
    its own. On CUDA kernels run asynchronously and no per-step ``cuda.synchronize`` is added (it would slow the
    loop it measures), so the split of GPU work is approximate: a phase counts the time to launch its kernels,
    and the GPU time lands where the host next waits for it (``float(loss)`` in the step's bookkeeping, or the
    next batch's copy). The sum over phases and the epoch's wall time stay exact.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as phase ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def batches(self, batches: Iterable[dict[str, Any]], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        """``batches`` moved to ``device``; the time blocked in ``next()`` plus the copy is ``data_wait``.

        What the caller does between two batches is not counted here: the generator is suspended then.
        """
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                self.add("data_wait", time.perf_counter() - t0)
                return
            moved = to_device(batch, device)
            self.add("data_wait", time.perf_counter() - t0)
            yield moved


def build_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    s1 = cfg.stage1
    if s1.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s1.lr, momentum=s1.momentum, weight_decay=s1.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=s1.lr, weight_decay=s1.weight_decay)


def lr_lambda(warmup: int, total: int) -> Any:
    def f(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        t = (epoch - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    return f


def set_threads(cfg: Config) -> None:
    """Worker start-up: torch threads (``train.torch_threads``), ltcore's log lines, Ray's quiet."""
    logs.setup()
    quiet_ray_loggers(logs.ray_log_level())
    if cfg.train.torch_threads > 0:
        torch.set_num_threads(cfg.train.torch_threads)


def build_recipe(cfg: Config, classes: list[str], counts: list[int]) -> Stage1Recipe:
    return build_stage1(cfg.stage1.method, loss_cfg=cfg.stage1.loss, class_counts=counts, classes=classes,
                        epochs=cfg.stage1.epochs, proj_dim=cfg.model.proj_dim)


def load_model(cfg: Config, classes: list[str], counts: list[int], state: dict[str, Any], meta: dict[str, Any],
               what: str = "stage-1 checkpoint") -> LTModel:
    """The model a checkpoint's state holds, built from the config (no pretrained weights are read), after checking
    that the checkpoint was made for this architecture and these classes."""
    model = make_model(cfg, len(classes), build_recipe(cfg, classes, counts), pretrained=False)
    ckpt.check_compatible(meta, model_meta(cfg, classes, model, "stage1"), what=what)
    model.load_state_dict(state["model"])
    return model


def load_stage1_model(cfg: Config, classes: list[str], counts: list[int], stage1: ray.train.Checkpoint) -> LTModel:
    with stage1.as_directory() as d:
        state, meta = ckpt.load_dir(d)
    return load_model(cfg, classes, counts, state, meta)


def worker_placement() -> dict[str, Any]:
    """This worker's rank and where it runs; every report lists all workers' (``workers``: which nodes trained)."""
    ctx = ray.train.get_context()
    return {"rank": ctx.get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname()}


def report_resumed(metrics: dict[str, Any], checkpoint: ray.train.Checkpoint) -> None:
    """Report a finished stage's checkpoint again (a rerun of a complete run); every rank must call it."""
    ray.train.report({**metrics, "resumed": True, "workers": dist.all_gather_object(worker_placement())},
                     checkpoint=checkpoint if dist.is_main() else None)


def save_and_report(metrics: dict[str, Any], state: dict[str, Any] | None, meta: dict[str, Any] | None,
                    predictions: dict[str, np.ndarray] | None = None) -> None:
    """Report one step's metrics with a checkpoint of ``state`` (rank 0; the others pass ``None``), and the final
    predictions beside the weights when given. Every rank must call it (``ray.train.report`` is collective)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if state is not None and meta is not None:
            ckpt.save_dir(tmp, state, meta)
            if predictions is not None:
                np.savez(os.path.join(tmp, ckpt.PRED_FILE), **predictions)  # type: ignore[arg-type]
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "workers": dist.all_gather_object(worker_placement())}, checkpoint=checkpoint)
