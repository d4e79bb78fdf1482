"""The Ray Train worker loops, written once: correct with one worker and with many.

Stage 1 trains backbone + head with a stage-1 recipe; stage 2 extracts features with the frozen stage-1
backbone and fits a calibrator. Both evaluate on predictions gathered across workers (rank 0 computes the
metrics once), checkpoint to the run's storage through ``ray.train.report`` and resume from
``ray.train.get_checkpoint()`` after a worker failure or when the same run id is started again.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn

from ltcore.config import Config, from_dict
from ltcore.data.transforms import normalize_images
from ltcore.engine import checkpoint as ckpt
from ltcore.engine import dist
from ltcore.eval.metrics import compute_metrics
from ltcore.methods.recipes import Stage1Recipe, build_stage1
from ltcore.models import LTModel, build_model

PRED_FILE = "predictions.npz"


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by both stages


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
        "image_size": None,
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


def _autocast(device: torch.device) -> Any:
    # bf16 autocast on CUDA only: CPU autocast is slower than fp32 on most CPUs.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
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
        batch = _to_device(batch, device)
        with _autocast(device):
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


def _metrics(cfg: Config, probs: np.ndarray, labels: np.ndarray, classes: list[str], counts: list[int]) -> dict:
    return compute_metrics(labels, probs, classes, counts, group_rule=cfg.eval.group_rule,
                           many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold,
                           ece_bins=cfg.eval.ece_bins)


def _log(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)


class _Progress:
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
            _log(f"{self.tag} step {self.steps}: {self.images} images on this worker, "
                 f"{self.images / (now - self.t0):.0f} img/s, mean loss {self.loss_sum / max(1, self.images):.4f}")


def _build_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    s1 = cfg.stage1
    if s1.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s1.lr, momentum=s1.momentum, weight_decay=s1.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=s1.lr, weight_decay=s1.weight_decay)


def _lr_lambda(warmup: int, total: int) -> Any:
    def f(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        t = (epoch - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    return f


def _set_threads(cfg: Config) -> None:
    if cfg.train.torch_threads > 0:
        torch.set_num_threads(cfg.train.torch_threads)


def _fault_injection(spec: str | None) -> tuple[int, str] | None:
    """For recovery tests: ``"<epoch>:<marker path>"`` makes rank 0 fail once, after that epoch's training."""
    if not spec or not dist.is_main():
        return None
    epoch, _, marker = spec.partition(":")
    return int(epoch), marker


# ---------------------------------------------------------------------------------------------------------------
# stage 1


def stage1_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function for stage 1. loop_config: cfg (dict), classes, train_counts."""
    cfg: Config = from_dict(loop_config["cfg"])
    classes: list[str] = loop_config["classes"]
    counts: list[int] = loop_config["train_counts"]
    s1 = cfg.stage1
    _set_threads(cfg)
    torch.manual_seed(cfg.train.seed)
    fault = _fault_injection(loop_config.get("inject_failure"))
    device = ray.train.torch.get_device()
    recipe = build_stage1(s1.method, loss_cfg=s1.loss, class_counts=counts, classes=classes, epochs=s1.epochs,
                          proj_dim=cfg.model.proj_dim)
    model = make_model(cfg, len(classes), recipe)
    recipe.setup(model)
    extra = recipe.state_modules().to(device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    start_epoch, best = 0, -1.0
    history: list[float] = []  # train loss per epoch, carried through checkpoints
    optimizer_state = scheduler_state = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state, meta = ckpt.load_dir(d)
        ckpt.check_compatible(meta, model_meta(cfg, classes, model, "stage1"))
        model.load_state_dict(state["model"])
        extra.load_state_dict(state["extra"])
        optimizer_state, scheduler_state = state["optimizer"], state["scheduler"]
        start_epoch, best = state["epoch"] + 1, state.get("best", -1.0)
        history = list(state.get("history", []))
        if start_epoch >= s1.epochs:
            # A finished run started again by its id: hand back its final checkpoint, train nothing.
            _log(f"[stage1] already complete ({s1.epochs} epochs); re-reporting its final checkpoint")
            ray.train.report({"epoch": start_epoch - 1, "resumed": True},
                             checkpoint=restored if dist.is_main() else None)
            return
        _log(f"[stage1] resuming from epoch {start_epoch} (checkpoint {restored.path})")

    # Recipes make every trainable parameter take part in each step; the ones that cannot say so.
    ddp_kwargs = {"find_unused_parameters": recipe.find_unused_parameters}
    # from here on `model` is the (DDP-wrapped) TrainModule; unwrap(model) is the LTModel
    model = ray.train.torch.prepare_model(TrainModule(model, extra), move_to_device=False,  # type: ignore[assignment]
                                          parallel_strategy_kwargs=ddp_kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _build_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(s1.warmup_epochs, s1.epochs))
    if optimizer_state is not None and scheduler_state is not None:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)

    for epoch in range(start_epoch, s1.epochs):
        t0 = time.perf_counter()
        model.train()
        recipe.start_epoch(epoch)
        loop_config["epoch_clock"].set_epoch(epoch)  # before iterating: this epoch's draws and augmentations
        hist = np.zeros(len(classes), np.int64)
        loss_sum, n_seen = 0.0, 0
        logs_sum: dict[str, float] = {}
        progress = _Progress(f"[stage1] epoch {epoch + 1}/{s1.epochs}", cfg.train.progress_every_s)
        for batch in train_batches(cfg, recipe, epoch):
            batch = _to_device(batch, device)
            with _autocast(device):
                loss, logs = recipe.loss(model, batch, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recipe.after_step(unwrap(model))
            bs = int(batch["label"].shape[0])
            hist += np.bincount(batch["label"].cpu().numpy(), minlength=len(classes))
            loss_sum += float(loss.detach()) * bs
            n_seen += bs
            progress.step(bs, float(loss.detach()))
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + v * bs
        scheduler.step()
        if fault is not None and fault[0] == epoch and not os.path.exists(fault[1]):
            open(fault[1], "w").close()  # fail once: the restarted worker group finds the marker
            raise RuntimeError(f"injected worker failure in epoch {epoch}")
        train_time = time.perf_counter() - t0
        # One all-reduce for everything summed over ranks: histogram, loss, counts, time.
        tot = dist.all_reduce_sum(np.concatenate([hist, [loss_sum, n_seen], [logs_sum[k] for k in sorted(logs_sum)]]))
        hist_all, loss_all, seen_all = tot[: len(classes)], tot[len(classes)], tot[len(classes) + 1]
        extra_logs = {k: float(v / max(1, seen_all)) for k, v in zip(sorted(logs_sum), tot[len(classes) + 2 :])}

        probs, labels = predict_shard(model, "val", cfg.train.eval_batch_size, device)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": float(loss_all / max(1, seen_all)),
                                   "train_images": int(seen_all), "train_time_s": train_time,
                                   "throughput_img_s": float(seen_all / max(train_time, 1e-9)),
                                   "train_class_histogram": [int(x) for x in hist_all], **extra_logs}
        history.append(metrics["train_loss"])
        metrics["train_loss_history"] = list(history)
        if dist.is_main() and len(labels):
            m = _metrics(cfg, probs, labels, classes, counts)
            metrics.update({f"val_{k}": m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")})
        nan = float("nan")
        _log(f"[stage1] epoch {epoch + 1}/{s1.epochs} loss {metrics['train_loss']:.4f} "
             f"val acc {metrics.get('val_accuracy', nan):.4f} bal-acc {metrics.get('val_balanced_accuracy', nan):.4f} "
             f"({train_time:.1f} s, {metrics['throughput_img_s']:.0f} img/s) "
             f"draws/class {metrics['train_class_histogram']}")

        final = epoch == s1.epochs - 1
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if dist.is_main():
                state = {"model": unwrap(model).state_dict(), "extra": extra.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "epoch": epoch, "best": best, "history": history,
                         "sampler": {"seed": cfg.train.seed, "epoch": epoch}}
                meta = model_meta(cfg, classes, unwrap(model), "stage1") | {"checkpoint_id": ckpt.new_checkpoint_id()}
                ckpt.save_dir(tmp, state, meta)
            if final:
                # Final predictions on val and test, gathered, saved beside the weights for the report.
                vp, vy = probs, labels
                tp, ty = predict_shard(model, "test", cfg.train.eval_batch_size, device)
                if dist.is_main():
                    np.savez(os.path.join(tmp, PRED_FILE), val_probs=vp, val_labels=vy, test_probs=tp, test_labels=ty)
            if dist.is_main():
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# stage 2


def stage2_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function for stage 2: features from the frozen stage-1 backbone -> calibrator.

    loop_config: cfg (dict), classes, train_counts, stage1_checkpoint (a ray.train.Checkpoint).
    """
    from ltcore.methods.stage2 import calibrate

    cfg: Config = from_dict(loop_config["cfg"])
    classes: list[str] = loop_config["classes"]
    counts: list[int] = loop_config["train_counts"]
    s2 = cfg.stage2
    _set_threads(cfg)
    device = ray.train.torch.get_device()
    if s2.method == "icc":
        icc_loop(loop_config)
        return

    restored = _stage2_restore(loop_config)
    if restored is not None:
        # Stage 2 reports once, at its end: a checkpoint here means it already finished.
        _log("[stage2] already complete; re-reporting its result")
        ray.train.report({"resumed": True}, checkpoint=restored if dist.is_main() else None)
        return

    model = _load_stage1_model(cfg, classes, counts, loop_config["stage1_checkpoint"]).to(device)

    t0 = time.perf_counter()
    _, ytr, ftr = predict_shard(model, "train", cfg.train.eval_batch_size, device, features=True)
    _, yva, fva = predict_shard(model, "val", cfg.train.eval_batch_size, device, features=True)
    _, yte, fte = predict_shard(model, "test", cfg.train.eval_batch_size, device, features=True)
    extract_s = time.perf_counter() - t0
    _log(f"[stage2] extracted features: train {len(ytr)}, val {len(yva)}, test {len(yte)} ({extract_s:.1f} s)")

    metrics: dict[str, Any] = {"feature_extract_s": extract_s}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if dist.is_main():
            # Rank 0 fits on the gathered features: the calibrators are tiny and deterministic.
            t1 = time.perf_counter()
            if not isinstance(model.head, nn.Linear):  # validate() refuses stage 2 without model.head=linear
                raise TypeError(f"stage 2 calibrates a linear head, got {type(model.head).__name__}")
            res = calibrate(s2.method, model.head, torch.as_tensor(ftr), torch.as_tensor(ytr),
                            torch.as_tensor(fva), torch.as_tensor(yva), counts, epochs=s2.epochs, lr=s2.lr,
                            batch_size=s2.batch_size, q=s2.q, taus=s2.tau_grid, la_tau=s2.la_tau,
                            seed=cfg.train.seed)
            model.head = res.head.to(device)
            metrics["calibrate_s"] = time.perf_counter() - t1
            metrics.update({f"calib_{k}": v for k, v in res.info.items() if isinstance(v, int | float)})
            with torch.no_grad():
                vp = torch.softmax(model.classify(torch.as_tensor(fva, device=device)).float(), 1).cpu().numpy()
                tp = torch.softmax(model.classify(torch.as_tensor(fte, device=device)).float(), 1).cpu().numpy()
            m = _metrics(cfg, vp, yva, classes, counts)
            metrics.update({f"val_{k}": m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")})
            tau = f" (tau {res.info['tau']})" if "tau" in res.info else ""
            _log(f"[stage2] {s2.method}: val acc {m['accuracy']:.4f} bal-acc {m['balanced_accuracy']:.4f}{tau}")
            meta2 = model_meta(cfg, classes, model, "stage2") | {"stage1_checkpoint_id": loop_config["stage1_id"]}
            ckpt.save_dir(tmp, {"model": model.state_dict(), "extra": {}, "epoch": 0, "calibration": res.info}, meta2)
            np.savez(os.path.join(tmp, PRED_FILE), val_probs=vp, val_labels=yva, test_probs=tp, test_labels=yte)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# stage 2, LMD's iterative classifier calibration


def _stage2_restore(loop_config: dict[str, Any]) -> ray.train.Checkpoint | None:
    """Stage 2's checkpoint to resume from, if it was built on the stage-1 checkpoint stage 2 gets now.

    A stage-2 checkpoint made from another stage-1 checkpoint (stage 1 trained on since) is stale: stage 2 reruns.
    """
    restored = ray.train.get_checkpoint()
    if restored is None:
        return None
    made_from = ckpt.read_meta(restored).get("stage1_checkpoint_id")
    if made_from != loop_config["stage1_id"]:
        _log("[stage2] its checkpoint was made from an earlier stage-1 model: calibrating again")
        return None
    return restored


def _load_stage1_model(cfg: Config, classes: list[str], counts: list[int], stage1: ray.train.Checkpoint) -> LTModel:
    with stage1.as_directory() as d:
        state, meta = ckpt.load_dir(d)
    recipe = build_stage1(cfg.stage1.method, loss_cfg=cfg.stage1.loss, class_counts=counts, classes=classes,
                          epochs=cfg.stage1.epochs, proj_dim=cfg.model.proj_dim)
    model = make_model(cfg, len(classes), recipe, pretrained=False)
    ckpt.check_compatible(meta, model_meta(cfg, classes, model, "stage1"), what="stage-1 checkpoint")
    model.load_state_dict(state["model"])
    return model


def icc_loop(loop_config: dict[str, Any]) -> None:
    """LMD stage 2 (Pan et al., arXiv 2502.03238): ``stage2.icc_rounds`` rounds, each a reported step.

    A round: features of the training split (test transforms, gathered) -> class Gaussians (+ EMA statistics)
    -> M-step: a fresh linear classifier on virtual features -> E-step: the classifier frozen, the backbone
    fine-tuned for one pass over augmented real images with GCE + FDC (``ltcore.methods.icc``).
    """
    from ltcore.methods.icc import ClassGaussians, e_step_loss, ema_alpha, fit_class_gaussians, m_step

    cfg: Config = from_dict(loop_config["cfg"])
    classes: list[str] = loop_config["classes"]
    counts: list[int] = loop_config["train_counts"]
    s2 = cfg.stage2
    device = ray.train.torch.get_device()
    model = _load_stage1_model(cfg, classes, counts, loop_config["stage1_checkpoint"]).to(device)
    c, d = len(classes), model.feat_dim
    ema = ClassGaussians(torch.zeros(c, d), torch.eye(d).repeat(c, 1, 1))
    start = 0
    restored = _stage2_restore(loop_config)
    backbone_opt_state = None
    if restored is not None:
        with restored.as_directory() as cdir:
            state, _ = ckpt.load_dir(cdir)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["extra"]["ema"])
        backbone_opt_state = state["optimizer"]
        start = state["epoch"] + 1
        _log(f"[stage2/icc] resuming at round {start + 1}")
    backbone = ray.train.torch.prepare_model(model.backbone, move_to_device=False)
    opt = torch.optim.SGD(backbone.parameters(), lr=s2.icc_lr, momentum=0.9, weight_decay=5e-4)
    if backbone_opt_state is not None:
        opt.load_state_dict(backbone_opt_state)

    for rnd in range(start, s2.icc_rounds):
        t0 = time.perf_counter()
        # 1-2. class Gaussians of the real training features, smoothed into the EMA statistics FDC uses
        _, ytr, ftr = predict_shard(model, "train", cfg.train.eval_batch_size, device, features=True)
        gauss = fit_class_gaussians(torch.as_tensor(ftr), torch.as_tensor(ytr), c)
        ema.ema_update_(gauss.means, gauss.covs, decay=ema_alpha(rnd))
        # 3. M-step: every rank trains the same classifier (same gathered data, same seed)
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rnd)
        head = m_step(gauss, s2.icc_virtual_per_class, d, c, lr=s2.icc_m_lr, generator=gen).to(device)
        head.requires_grad_(False)
        model.head = head
        # 4. E-step: one pass over augmented real images, classifier frozen
        loop_config["epoch_clock"].set_epoch(rnd)
        backbone.train()
        means, covs = ema.means.to(device), ema.covs.to(device)
        loss_sum, seen = 0.0, 0
        progress = _Progress(f"[stage2/icc] round {rnd + 1}/{s2.icc_rounds} e-step", cfg.train.progress_every_s)
        for batch in lockstep(iter_shard("train_aug", s2.batch_size, cfg.train.shuffle_buffer)):
            batch = _to_device(batch, device)
            with _autocast(device):
                feats = backbone(batch["image"])
                logits = head(feats)
            loss, _ = e_step_loss(feats.float(), logits.float(), batch["label"], means, covs, gce_q=s2.icc_gce_q,
                                  fdc_weight=s2.icc_fdc_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(batch["label"])
            seen += len(batch["label"])
            progress.step(len(batch["label"]), float(loss.detach()))
        tot = dist.all_reduce_sum(np.array([loss_sum, seen], np.float64))
        metrics: dict[str, Any] = {"round": rnd, "e_step_loss": float(tot[0] / max(1, tot[1])),
                                   "round_s": time.perf_counter() - t0}
        final = rnd == s2.icc_rounds - 1
        vp, vy = predict_shard(model, "val", cfg.train.eval_batch_size, device)
        if dist.is_main():
            m = _metrics(cfg, vp, vy, classes, counts)
            metrics.update({f"val_{k}": m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")})
            _log(f"[stage2/icc] round {rnd + 1}/{s2.icc_rounds} e-step loss {metrics['e_step_loss']:.4f} "
                 f"val acc {m['accuracy']:.4f} bal-acc {m['balanced_accuracy']:.4f} ({metrics['round_s']:.1f} s)")
        with tempfile.TemporaryDirectory() as tmp:
            if final:
                tp, ty = predict_shard(model, "test", cfg.train.eval_batch_size, device)
            checkpoint = None
            if dist.is_main():
                ckpt.save_dir(tmp, {"model": model.state_dict(), "extra": {"ema": ema.state_dict()},
                                    "optimizer": opt.state_dict(), "epoch": rnd},
                              model_meta(cfg, classes, model, "stage2")
                              | {"stage1_checkpoint_id": loop_config["stage1_id"]})
                if final:
                    np.savez(os.path.join(tmp, PRED_FILE), val_probs=vp, val_labels=vy, test_probs=tp, test_labels=ty)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
