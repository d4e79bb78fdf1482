"""The Ray Train worker loops, written once: correct with one worker and with many.

Stage 1 trains backbone + head with a stage-1 recipe; stage 2 extracts features with the frozen stage-1
backbone and fits a calibrator, or runs LMD's iterative classifier calibration. Both evaluate on predictions
gathered across workers (rank 0 computes the metrics once), checkpoint to the run's storage through
``ray.train.report`` and resume from ``ray.train.get_checkpoint()`` after a worker failure or when the same run id
is started again. The pieces they are made of are in :mod:`ltcore.engine.worker`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn

from ltcore.config import Config, from_dict
from ltcore.engine import checkpoint as ckpt
from ltcore.engine import dist
from ltcore.engine.worker import (
    PhaseTimer,
    Progress,
    TrainModule,
    autocast,
    build_optimizer,
    build_recipe,
    eval_metrics,
    iter_shard,
    load_stage1_model,
    lockstep,
    log,
    lr_lambda,
    make_model,
    model_meta,
    predict_shard,
    report_resumed,
    save_and_report,
    set_threads,
    to_device,
    train_batches,
    unwrap,
)
from ltcore.methods.icc_calibrator import IccCalibrator
from ltcore.methods.recipes import Stage1Recipe

VAL_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")
# the phases of a training epoch that PhaseTimer measures (each reported as time_<phase>_s)
TRAIN_PHASES = ("data_wait", "forward_backward", "optimizer")

# ---------------------------------------------------------------------------------------------------------------
# stage 1


@dataclass
class _Stage1:
    """What one stage-1 worker holds between epochs."""

    cfg: Config
    classes: list[str]
    counts: list[int]
    recipe: Stage1Recipe
    model: nn.Module  # the (DDP-wrapped) TrainModule; unwrap(model) is the LTModel
    extra: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    start_epoch: int = 0
    best: float = -1.0
    history: list[float] = field(default_factory=list)  # train loss per epoch, carried through checkpoints


def stage1_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function for stage 1. loop_config: cfg (dict), classes, train_counts, epoch_clock.

    Each epoch's metrics carry this worker's time breakdown (Ray Train keeps rank 0's): ``time_data_wait_s``,
    ``time_forward_backward_s``, ``time_optimizer_s`` and ``time_other_s`` (the rest of ``train_time_s``:
    per-step bookkeeping, the epoch's all-reduce), ``time_val_s`` (val predictions + metrics) and
    ``time_prev_checkpoint_s``: the *previous* epoch's checkpoint (state dict, save, ``ray.train.report``), which
    is only known once that report has returned; absent in a run's (or a resume's) first epoch. The final
    epoch's checkpoint time is logged after its report.
    """
    st = _stage1_setup(loop_config)
    if st is None:
        return  # the run had finished already; its checkpoint was reported again
    prev_checkpoint_s: float | None = None
    for epoch in range(st.start_epoch, st.cfg.stage1.epochs):
        timer = PhaseTimer()
        t0 = time.perf_counter()
        loop_config["epoch_clock"].set_epoch(epoch)  # before iterating: this epoch's draws and augmentations
        summed = _train_epoch(st, epoch, timer)
        metrics = _epoch_metrics(st, epoch, summed, time.perf_counter() - t0, timer)
        with timer.phase("val"):
            probs, labels = predict_shard(st.model, "val", st.cfg.train.eval_batch_size, st.device)
            if dist.is_main() and len(labels):
                m = eval_metrics(st.cfg, probs, labels, st.classes, st.counts)
                metrics.update({f"val_{k}": m[k] for k in VAL_KEYS})
        metrics["time_val_s"] = timer.seconds["val"]
        if prev_checkpoint_s is not None:
            metrics["time_prev_checkpoint_s"] = prev_checkpoint_s
        _log_epoch(st, epoch, metrics)
        predictions = None
        if epoch == st.cfg.stage1.epochs - 1:  # the final model's gathered val/test predictions, for the report
            tp, ty = predict_shard(st.model, "test", st.cfg.train.eval_batch_size, st.device)
            predictions = {"val_probs": probs, "val_labels": labels, "test_probs": tp, "test_labels": ty}
        t_ckpt = time.perf_counter()
        state, meta = _stage1_state(st, epoch) if dist.is_main() else (None, None)
        save_and_report(metrics, state, meta, predictions)
        prev_checkpoint_s = time.perf_counter() - t_ckpt
    if prev_checkpoint_s is not None:
        log(f"[stage1] final checkpoint saved and reported ({prev_checkpoint_s:.1f} s)")


def _stage1_state(st: _Stage1, epoch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rank 0's checkpoint of the epoch just trained: (state, meta)."""
    state = {"model": unwrap(st.model).state_dict(), "extra": st.extra.state_dict(),
             "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict(),
             "epoch": epoch, "best": st.best, "history": st.history,
             "sampler": {"seed": st.cfg.train.seed, "epoch": epoch}}
    meta = model_meta(st.cfg, st.classes, unwrap(st.model), "stage1")
    meta["checkpoint_id"] = ckpt.new_checkpoint_id()
    return state, meta


def _stage1_setup(loop_config: dict[str, Any]) -> _Stage1 | None:
    """Model, recipe modules, optimizer and schedule, restored from the latest checkpoint when there is one.
    ``None``: the checkpoint is the final epoch's (the run is complete) and has been reported again."""
    cfg: Config = from_dict(loop_config["cfg"])
    classes, counts = list(loop_config["classes"]), list(loop_config["train_counts"])
    set_threads(cfg)
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()
    recipe = build_recipe(cfg, classes, counts)
    model = make_model(cfg, len(classes), recipe)
    recipe.setup(model)
    extra = recipe.state_modules().to(device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    state: dict[str, Any] | None = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state, meta = ckpt.load_dir(d)
        ckpt.check_compatible(meta, model_meta(cfg, classes, model, "stage1"))
        model.load_state_dict(state["model"])
        extra.load_state_dict(state["extra"])
        if state["epoch"] + 1 >= cfg.stage1.epochs:
            log(f"[stage1] already complete ({cfg.stage1.epochs} epochs); re-reporting its final checkpoint")
            report_resumed({"epoch": state["epoch"]}, restored)
            return None
        log(f"[stage1] resuming from epoch {state['epoch'] + 1} (checkpoint {restored.path})")

    # Recipes make every trainable parameter take part in each step; the ones that cannot say so.
    ddp_kwargs = {"find_unused_parameters": recipe.find_unused_parameters}
    wrapped = ray.train.torch.prepare_model(TrainModule(model, extra), move_to_device=False,
                                            parallel_strategy_kwargs=ddp_kwargs)
    optimizer = build_optimizer(cfg, [p for p in wrapped.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.stage1.warmup_epochs, cfg.stage1.epochs))
    st = _Stage1(cfg, classes, counts, recipe, wrapped, extra, optimizer, scheduler, device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        st.start_epoch, st.best = state["epoch"] + 1, state.get("best", -1.0)
        st.history = list(state.get("history", []))
    return st


def _train_epoch(st: _Stage1, epoch: int, timer: PhaseTimer) -> tuple[np.ndarray, list[str]]:
    """One epoch of steps on this worker; returns, summed over all workers: the class histogram of the drawn
    labels, the summed loss, the number of images, and each recipe log value summed; and the log values' names.
    ``timer`` gets this worker's ``data_wait``, ``forward_backward`` and ``optimizer`` seconds."""
    st.model.train()
    st.recipe.start_epoch(epoch)
    hist = np.zeros(len(st.classes), np.int64)
    loss_sum, n_seen = 0.0, 0
    logs_sum: dict[str, float] = {}
    progress = Progress(f"[stage1] epoch {epoch + 1}/{st.cfg.stage1.epochs}", st.cfg.train.progress_every_s)
    for batch in timer.batches(train_batches(st.cfg, st.recipe, epoch), st.device):
        with timer.phase("forward_backward"), autocast(st.device):
            loss, logs = st.recipe.loss(st.model, batch, epoch)
        with timer.phase("optimizer"):
            st.optimizer.zero_grad(set_to_none=True)
        with timer.phase("forward_backward"):
            loss.backward()
        with timer.phase("optimizer"):
            st.optimizer.step()
            st.recipe.after_step(unwrap(st.model))
        bs, value = int(batch["label"].shape[0]), float(loss.detach())
        hist += np.bincount(batch["label"].cpu().numpy(), minlength=len(st.classes))
        loss_sum, n_seen = loss_sum + value * bs, n_seen + bs
        progress.step(bs, value)
        for k, v in logs.items():
            logs_sum[k] = logs_sum.get(k, 0.0) + v * bs
    st.scheduler.step()
    # One all-reduce for everything summed over ranks (every recipe logs the same keys on every rank).
    names = sorted(logs_sum)
    return dist.all_reduce_sum(np.concatenate([hist, [loss_sum, n_seen], [logs_sum[k] for k in names]])), names


def _epoch_metrics(st: _Stage1, epoch: int, summed: tuple[np.ndarray, list[str]], train_time: float,
                   timer: PhaseTimer) -> dict:
    (totals, names), c = summed, len(st.classes)
    hist_all, loss_all, seen_all, extra_values = totals[:c], totals[c], totals[c + 1], totals[c + 2:]
    metrics: dict[str, Any] = {"epoch": epoch, "train_loss": float(loss_all / max(1, seen_all)),
                               "train_images": int(seen_all), "train_time_s": train_time,
                               "throughput_img_s": float(seen_all / max(train_time, 1e-9)),
                               "train_class_histogram": [int(x) for x in hist_all],
                               "torch_threads": torch.get_num_threads()}  # this worker's intra-op threads
    metrics.update({k: float(v / max(1, seen_all)) for k, v in zip(names, extra_values)})
    # This worker's split of train_time_s; "other" is the rest (bookkeeping, the epoch's all-reduce, set_epoch).
    steps = {f"time_{k}_s": timer.seconds.get(k, 0.0) for k in TRAIN_PHASES}
    metrics.update(steps, time_other_s=max(0.0, train_time - sum(steps.values())))
    st.history.append(metrics["train_loss"])
    metrics["train_loss_history"] = list(st.history)
    return metrics


def _log_epoch(st: _Stage1, epoch: int, metrics: dict[str, Any]) -> None:
    nan = float("nan")
    ckpt_part = f", prev ckpt {metrics['time_prev_checkpoint_s']:.1f} s" if "time_prev_checkpoint_s" in metrics else ""
    log(f"[stage1] epoch {epoch + 1}/{st.cfg.stage1.epochs} loss {metrics['train_loss']:.4f} "
        f"val acc {metrics.get('val_accuracy', nan):.4f} bal-acc {metrics.get('val_balanced_accuracy', nan):.4f} "
        f"({metrics['train_time_s']:.1f} s, {metrics['throughput_img_s']:.0f} img/s: "
        f"data {metrics['time_data_wait_s']:.1f} s, compute {metrics['time_forward_backward_s']:.1f} s, "
        f"optim {metrics['time_optimizer_s']:.1f} s, other {metrics['time_other_s']:.1f} s; "
        f"val {metrics['time_val_s']:.1f} s{ckpt_part}) draws/class {metrics['train_class_histogram']}")


# ---------------------------------------------------------------------------------------------------------------
# stage 2


def stage2_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function for stage 2: features from the frozen stage-1 backbone -> calibrator.

    loop_config: cfg (dict), classes, train_counts, stage1_checkpoint (a ray.train.Checkpoint), stage1_id.
    """
    cfg: Config = from_dict(loop_config["cfg"])
    set_threads(cfg)
    if cfg.stage2.method == "icc":
        icc_loop(loop_config)
        return
    restored = stage2_restore(loop_config)
    if restored is not None:
        # Stage 2 reports once, at its end: a checkpoint here means it already finished.
        log("[stage2] already complete; re-reporting its result")
        report_resumed({}, restored)
        return
    classes, counts = list(loop_config["classes"]), list(loop_config["train_counts"])
    device = ray.train.torch.get_device()
    model = load_stage1_model(cfg, classes, counts, loop_config["stage1_checkpoint"]).to(device)

    t0 = time.perf_counter()
    feats = {s: predict_shard(model, s, cfg.train.eval_batch_size, device, features=True)
             for s in ("train", "val", "test")}  # each (probs, labels, features), gathered
    extract_s = time.perf_counter() - t0
    log(f"[stage2] extracted features: {', '.join(f'{s} {len(v[1])}' for s, v in feats.items())} "
        f"({extract_s:.1f} s)")
    metrics: dict[str, Any] = {"feature_extract_s": extract_s}
    state = meta = predictions = None
    if dist.is_main():  # rank 0 fits on the gathered features: the calibrators are tiny and deterministic
        info, predictions = _calibrate(cfg, model, feats, counts, metrics, classes)
        state = {"model": model.state_dict(), "extra": {}, "epoch": 0, "calibration": info}
        meta = model_meta(cfg, classes, model, "stage2") | {"stage1_checkpoint_id": loop_config["stage1_id"]}
    save_and_report(metrics, state, meta, predictions)


def _calibrate(cfg: Config, model: Any, feats: dict[str, tuple[np.ndarray, ...]], counts: list[int],
               metrics: dict[str, Any], classes: list[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit the stage-2 calibrator on the train features, replace the model's head with it; adds its figures to
    ``metrics``; returns its info and the val/test predictions."""
    from ltcore.methods.stage2 import calibrate

    s2, device = cfg.stage2, next(model.parameters()).device
    (_, ytr, ftr), (_, yva, fva), (_, yte, fte) = feats["train"], feats["val"], feats["test"]
    if not isinstance(model.head, nn.Linear):  # validate() refuses stage 2 without model.head=linear
        raise TypeError(f"stage 2 calibrates a linear head, got {type(model.head).__name__}")
    t1 = time.perf_counter()
    res = calibrate(s2.method, model.head, torch.as_tensor(ftr), torch.as_tensor(ytr), torch.as_tensor(fva),
                    torch.as_tensor(yva), counts, epochs=s2.epochs, lr=s2.lr, batch_size=s2.batch_size, q=s2.q,
                    taus=s2.tau_grid, la_tau=s2.la_tau, seed=cfg.train.seed)
    model.head = res.head.to(device)
    metrics["calibrate_s"] = time.perf_counter() - t1
    metrics.update({f"calib_{k}": v for k, v in res.info.items() if isinstance(v, int | float)})
    with torch.no_grad():
        vp = torch.softmax(model.classify(torch.as_tensor(fva, device=device)).float(), 1).cpu().numpy()
        tp = torch.softmax(model.classify(torch.as_tensor(fte, device=device)).float(), 1).cpu().numpy()
    m = eval_metrics(cfg, vp, yva, classes, counts)
    metrics.update({f"val_{k}": m[k] for k in VAL_KEYS})
    tau = f" (tau {res.info['tau']})" if "tau" in res.info else ""
    log(f"[stage2] {s2.method}: val acc {m['accuracy']:.4f} bal-acc {m['balanced_accuracy']:.4f}{tau}")
    return res.info, {"val_probs": vp, "val_labels": yva, "test_probs": tp, "test_labels": yte}


def stage2_restore(loop_config: dict[str, Any]) -> ray.train.Checkpoint | None:
    """Stage 2's checkpoint to resume from, if it was built on the stage-1 checkpoint stage 2 gets now.

    A stage-2 checkpoint made from another stage-1 checkpoint (stage 1 trained on since) is stale: stage 2 reruns.
    """
    restored = ray.train.get_checkpoint()
    if restored is None:
        return None
    made_from = ckpt.read_meta(restored).get("stage1_checkpoint_id")
    if made_from != loop_config["stage1_id"]:
        log("[stage2] its checkpoint was made from an earlier stage-1 model: calibrating again")
        return None
    return restored


# ---------------------------------------------------------------------------------------------------------------
# stage 2, LMD's iterative classifier calibration


def icc_loop(loop_config: dict[str, Any]) -> None:
    """LMD stage 2 (Pan et al., arXiv 2502.03238): ``stage2.icc_rounds`` rounds, each a reported step.

    A round: features of the training split (test transforms, gathered) -> class Gaussians (+ EMA statistics)
    -> M-step: a fresh linear classifier on virtual features -> E-step: the classifier frozen, the backbone
    fine-tuned for one pass over augmented real images with GCE + FDC (``ltcore.methods.icc``).
    """
    cfg: Config = from_dict(loop_config["cfg"])
    classes, counts = list(loop_config["classes"]), list(loop_config["train_counts"])
    s2, device = cfg.stage2, ray.train.torch.get_device()
    model = load_stage1_model(cfg, classes, counts, loop_config["stage1_checkpoint"]).to(device)
    icc = IccCalibrator(num_classes=len(classes), feat_dim=model.feat_dim)
    start, opt_state = 0, None
    restored = stage2_restore(loop_config)
    if restored is not None:
        with restored.as_directory() as cdir:
            saved, _ = ckpt.load_dir(cdir)
        model.load_state_dict(saved["model"])
        icc.load_state_dict(saved["extra"]["ema"])
        opt_state, start = saved["optimizer"], saved["epoch"] + 1
        log(f"[stage2/icc] resuming at round {start + 1}")
    backbone = ray.train.torch.prepare_model(model.backbone, move_to_device=False)
    opt = torch.optim.SGD(backbone.parameters(), lr=s2.icc_lr, momentum=0.9, weight_decay=5e-4)
    if opt_state is not None:
        opt.load_state_dict(opt_state)

    for rnd in range(start, s2.icc_rounds):
        t0 = time.perf_counter()
        _, ytr, ftr = predict_shard(model, "train", cfg.train.eval_batch_size, device, features=True)
        # M-step on the real training features' Gaussians: every rank trains the same classifier (same data, seed)
        model.head = icc.m_step(torch.as_tensor(ftr), torch.as_tensor(ytr), rnd, s2.icc_virtual_per_class,
                                lr=s2.icc_m_lr, seed=cfg.train.seed * 1000 + rnd).to(device)
        loop_config["epoch_clock"].set_epoch(rnd)
        loss = _icc_e_step(cfg, backbone, model.head, icc, opt, rnd, device)
        metrics: dict[str, Any] = {"round": rnd, "e_step_loss": loss, "round_s": time.perf_counter() - t0}
        vp, vy = predict_shard(model, "val", cfg.train.eval_batch_size, device)
        if dist.is_main():
            m = eval_metrics(cfg, vp, vy, classes, counts)
            metrics.update({f"val_{k}": m[k] for k in VAL_KEYS})
            log(f"[stage2/icc] round {rnd + 1}/{s2.icc_rounds} e-step loss {loss:.4f} "
                f"val acc {m['accuracy']:.4f} bal-acc {m['balanced_accuracy']:.4f} ({metrics['round_s']:.1f} s)")
        predictions = None
        if rnd == s2.icc_rounds - 1:
            tp, ty = predict_shard(model, "test", cfg.train.eval_batch_size, device)
            predictions = {"val_probs": vp, "val_labels": vy, "test_probs": tp, "test_labels": ty}
        state: dict[str, Any] | None = None
        meta: dict[str, Any] | None = None
        if dist.is_main():
            state = {"model": model.state_dict(), "extra": {"ema": icc.state_dict()}, "optimizer": opt.state_dict(),
                     "epoch": rnd}
            meta = model_meta(cfg, classes, model, "stage2") | {"stage1_checkpoint_id": loop_config["stage1_id"]}
        save_and_report(metrics, state, meta, predictions)


def _icc_e_step(cfg: Config, backbone: nn.Module, head: nn.Module, icc: IccCalibrator, opt: torch.optim.Optimizer,
                rnd: int, device: torch.device) -> float:
    """E-step: one pass over augmented real images, the classifier frozen; the mean loss over all workers."""
    s2 = cfg.stage2
    backbone.train()
    loss_sum, seen = 0.0, 0
    progress = Progress(f"[stage2/icc] round {rnd + 1}/{s2.icc_rounds} e-step", cfg.train.progress_every_s)
    for batch in lockstep(iter_shard("train_aug", s2.batch_size, cfg.train.shuffle_buffer)):
        batch = to_device(batch, device)
        with autocast(device):
            feats = backbone(batch["image"])
            logits = head(feats)
        loss = icc.e_step_loss(feats.float(), logits.float(), batch["label"], gce_q=s2.icc_gce_q,
                               fdc_weight=s2.icc_fdc_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n, value = len(batch["label"]), float(loss.detach())
        loss_sum, seen = loss_sum + value * n, seen + n
        progress.step(n, value)
    tot = dist.all_reduce_sum(np.array([loss_sum, seen], np.float64))
    return float(tot[0] / max(1, tot[1]))
