"""Stage-2 calibrators on a frozen backbone (Kang et al., "Decoupling Representation and Classifier for
Long-Tailed Recognition", ICLR 2020, arXiv 1910.09217; Menon et al., arXiv 2007.07314 for post-hoc LA).

Every calibrator here works on features extracted once from the frozen stage-1 backbone (test transforms)
and returns a plain ``nn.Linear`` head, so a calibrated model is saved and loaded like any other:
- ``crt``: re-initialised linear classifier trained with class-balanced sampling.
- ``tau_norm``: ``w_j / ||w_j||^tau``, bias dropped, tau chosen on validation by balanced accuracy.
- ``lws``: per-class scales ``f_j`` learnt with class-balanced sampling, folded into W and b.
- ``posthoc_la``: ``b_j <- b_j - tau * log pi_j`` (logit adjustment at inference).
- ``crw``: fine-tune the stage-1 classifier with class-balanced re-weighted CE, instance sampling.
- ``drs``: fine-tune the stage-1 classifier with class-balanced re-sampling (deferred re-sampling).

**Interpretation**: the papers train cRT/LWS on augmented images through the frozen backbone; we train on
cached features of un-augmented images, which is the common fast variant (the backbone is frozen, so only
augmentation diversity is lost) and makes stage 2 seconds rather than epochs of backbone passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ltcore.config import TAU_GRID
from ltcore.data.sampling import class_probabilities, draw_repeats
from ltcore.losses import CrossEntropyLoss, class_balanced_weights
from ltcore.methods.calibrators import LWSClassifier, reinit_linear, select_tau, tau_normalize

FEATURE_CALIBRATORS = ("crt", "tau_norm", "lws", "posthoc_la", "crw", "drs")


@dataclass
class CalibrationResult:
    head: nn.Linear
    info: dict[str, object]


def _train_head(
    head: nn.Module,
    feats: torch.Tensor,
    labels: torch.Tensor,
    class_counts: Sequence[int],
    *,
    q: float | None,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight: torch.Tensor | None = None,
) -> list[float]:
    """SGD on cached features; ``q`` set = resample each epoch with p_j ~ n_j^q (None = every sample once)."""
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    total_steps = max(1, epochs * math.ceil(len(labels) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    crit = CrossEntropyLoss(weight=weight)
    y_np = labels.numpy()
    probs = class_probabilities(np.asarray(class_counts), q) if q is not None else None
    losses = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch, 7])
        if probs is None:
            idx = np.arange(len(y_np))
        else:
            reps = draw_repeats(y_np, np.asarray(class_counts), probs, seed=seed, epoch=epoch, key=7)
            idx = np.repeat(np.arange(len(y_np)), reps)
        idx = rng.permutation(idx)
        running = 0.0
        for start in range(0, len(idx), batch_size):
            b = torch.as_tensor(idx[start : start + batch_size])
            loss = crit(head(feats[b]), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(b)
        losses.append(running / max(1, len(idx)))
    return losses


def calibrate(
    method: str,
    head: nn.Linear,
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    class_counts: Sequence[int],
    *,
    epochs: int = 10,
    lr: float = 0.1,
    batch_size: int = 64,
    q: float = 0.0,
    taus: Sequence[float] = TAU_GRID,
    la_tau: float = 1.0,
    seed: int = 0,
) -> CalibrationResult:
    """Fit the named calibrator; returns a new linear head (the input head is not modified).

    Args:
        head: stage-1 linear classifier (C, D).
        train_feats/val_feats: features (N, D) from the frozen backbone; labels (N,).
        class_counts: training samples per class (C,).
    """
    if not isinstance(head, nn.Linear):
        raise ValueError(f"stage-2 calibrator {method!r} needs a linear stage-1 head (model.head=linear)")
    head = head.cpu().float()
    train_feats, val_feats = train_feats.float(), val_feats.float()
    if method == "crt":
        new = reinit_linear(head, generator=torch.Generator().manual_seed(seed))
        losses = _train_head(
            new, train_feats, train_labels, class_counts, q=q, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed
        )
        return CalibrationResult(new, {"loss": losses})
    if method == "tau_norm":
        best, scores = select_tau(val_feats, val_labels, head.weight.detach(), taus)
        new = nn.Linear(head.in_features, head.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(tau_normalize(head.weight.detach(), best))
            new.bias.zero_()  # tau-norm drops the bias
        return CalibrationResult(
            new, {"tau": best, "val_balanced_accuracy_by_tau": {str(k): v for k, v in scores.items()}}
        )
    if method == "lws":
        lws = LWSClassifier(head)
        losses = _train_head(
            lws, train_feats, train_labels, class_counts, q=q, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed
        )
        return CalibrationResult(lws.to_linear(), {"loss": losses, "scales": lws.scales.detach().tolist()})
    if method == "posthoc_la":
        new = _copy_linear(head)
        counts = torch.as_tensor(class_counts, dtype=torch.float32)
        with torch.no_grad():
            # argmax_y z_y - tau * log pi_y, folded into the bias
            new.bias.sub_(la_tau * torch.log(counts / counts.sum()))
        return CalibrationResult(new, {"tau": la_tau})
    if method == "crw":
        new = _copy_linear(head)
        w = class_balanced_weights(class_counts)
        losses = _train_head(
            new,
            train_feats,
            train_labels,
            class_counts,
            q=None,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            weight=w,
        )
        return CalibrationResult(new, {"loss": losses})
    if method == "drs":
        new = _copy_linear(head)
        losses = _train_head(
            new, train_feats, train_labels, class_counts, q=q, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed
        )
        return CalibrationResult(new, {"loss": losses})
    raise ValueError(
        f"stage2.method {method!r} is not a feature calibrator; choose one of {', '.join(FEATURE_CALIBRATORS)}"
    )


def _copy_linear(head: nn.Linear) -> nn.Linear:
    new = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        if head.bias is not None:
            new.bias.copy_(head.bias)
        else:
            new.bias.zero_()
    return new
