"""Metric learning in stage 1 of a two-stage framework (Zeng et al., arXiv 2207.06975; METHODS.md section 2).

``L1 = CE + lambda * L_metric`` with batch-hard triplet, class-centre triplet or SupCon on the model's
L2-normalised embedding; stage 2 (cRT, cRW, DRS) re-balances the classifier alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ltcore.losses import BatchHardTripletLoss, ClassCentreTripletLoss, SupConLoss
from ltcore.methods._recipe import PaperRecipe, Stage1Recipe, ce_from_config, check_proj_dim, fp32, require, two_views

__all__ = ["METRIC_LAMBDAS", "METRIC_LOSSES", "MetricRecipe", "build"]

METRIC_LOSSES = ("triplet", "centre_triplet", "supcon")
#: lambda of ``L1 = CE + lambda * L_metric`` per loss, from the authors' public configs (METHODS.md section 2)
METRIC_LAMBDAS = {"triplet": 0.03, "centre_triplet": 0.07, "supcon": 1.0}


class MetricRecipe(PaperRecipe):
    """``L1 = CE + lambda * L_metric`` on the model's L2-normalised ``embedding`` (METHODS.md section 2).

    **Interpretation** (from the authors' public configs): ``L_metric`` is batch-hard triplet (lambda 0.03,
    margin 0.2), class-centre triplet (lambda 0.07) or SupCon (lambda 1.0, tau 0.1); ``lam=None`` takes the
    chosen loss's lambda (:data:`METRIC_LAMBDAS`), a number overrides it. SupCon uses two weak views (``image``,
    ``image2``), forwarded as one batch; the embeddings enter as ``(N, 2, P)`` and CE is on the first view's
    logits. The triplet losses use one view and profit from P x K class-balanced batches
    (:class:`~ltcore.methods.pk.PKBatcher`).

    Args:
        criterion: the classification loss (CE).
        metric: ``triplet``, ``centre_triplet`` or ``supcon``.
        lam: weight of the metric loss; None for the loss's own default.
        margin: triplet margin.
        temperature: SupCon tau.

    Raises:
        ValueError: unknown ``metric`` or negative ``lam``.
    """

    needs_projector = True

    def __init__(self, *, criterion: nn.Module, metric: str, lam: float | None = None, margin: float = 0.2,
                 temperature: float = 0.1) -> None:
        super().__init__(criterion)
        if metric not in METRIC_LOSSES:
            raise ValueError(f"loss.metric_loss {metric!r} is not valid; choose one of {', '.join(METRIC_LOSSES)}")
        lam = METRIC_LAMBDAS[metric] if lam is None else lam
        if lam < 0:
            raise ValueError(f"loss.metric_lambda must be >= 0, got {lam}")
        self.metric_name, self.lam = metric, float(lam)
        self.metric: nn.Module
        if metric == "triplet":
            self.metric = BatchHardTripletLoss(margin=margin)
        elif metric == "centre_triplet":
            self.metric = ClassCentreTripletLoss(margin=margin)
        else:
            self.metric = SupConLoss(temperature=temperature)
        self.views = ("weak", "weak") if metric == "supcon" else ("weak",)

    def state_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"criterion": self.criterion, "metric": self.metric})

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        y = batch["label"]
        n = y.shape[0]
        two = len(self.views) == 2
        out = model(two_views(batch, "metric") if two else batch["image"])
        emb = require(out, "embedding", "metric", "proj_dim > 0")  # (N or 2N, P)
        ce = self.criterion(out["logits"][:n], y)
        with fp32(y.device):
            z = torch.stack([emb[:n], emb[n:]], dim=1).float() if two else emb.float()  # (N, 2, P) or (N, P)
            metric = self.metric(z, y)
        return ce + self.lam * metric, {"ce": float(ce.detach()), self.metric_name: float(metric.detach())}


def build(*, loss_cfg: Any, proj_dim: int, **_: Any) -> Stage1Recipe:
    """``stage1.method=metric`` from config: ``loss.metric_*`` (``metric_lambda: auto`` = the loss's default)."""
    check_proj_dim("metric", proj_dim)
    lam = None if loss_cfg.metric_lambda == "auto" else float(loss_cfg.metric_lambda)
    return MetricRecipe(criterion=ce_from_config(loss_cfg), metric=loss_cfg.metric_loss, lam=lam,
                        margin=loss_cfg.metric_margin, temperature=loss_cfg.temperature)
