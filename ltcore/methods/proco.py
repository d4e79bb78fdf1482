"""ProCo's stage-1 recipe: "ProCo: Prototype-aware Contrastive Learning for Long-tailed Medical Image
Classification", Yang, Pan et al., MICCAI 2022, arXiv 2209.00183 (METHODS.md section 1).

``L = CE(head(F(h))) + proco_lambda * L_pl(G(h))``: the proto-loss is :class:`~ltcore.losses.ProCoLoss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ltcore.dist import gather_rows
from ltcore.losses import ProCoLoss
from ltcore.methods._recipe import PaperRecipe, Stage1Recipe, ce_from_config, check_proj_dim, fp32, require
from ltcore.models.heads import ProjectionMLP

__all__ = ["ProCoRecipe", "build"]


class ProCoRecipe(PaperRecipe):
    """ProCo: ``L = CE(head(f)) + lambda * L_pl(q, q.detach(), y)`` (METHODS.md section 1; arXiv 2209.00183).

    Two projectors on the backbone features ``h (N, D)``, both trained:

    - F, the image-feature projector, is a neck the recipe puts into the model (:meth:`LTModel.set_neck`, an
      MLP D -> D -> D): ``f = F(h)`` is what the model's classifier head reads, so F learns through the CE
      term, and prediction, stage-2 calibrators and checkpoints all see ``f``;
    - G, the query projector (:class:`~ltcore.models.heads.ProjectionMLP`, D -> D -> P, L2-normalised), owned
      by the recipe (``state_modules()['query_head']``): ``q = G(h)`` feeds the proto-loss, so G learns
      through ``L_pl`` (and the backbone through both terms).

    **Interpretation** (METHODS.md leaves the key encoder open): no momentum copy of G; the keys are the
    batch's own queries, detached (``k = q.detach()``), so the prototypes are EMAs of q and the queue holds
    detached q. Prototype/queue updates happen in ``after_step`` (after the optimiser step, as ``ProCoLoss``
    asks), with the batch's keys and labels gathered from every rank (no grad) so all ranks keep identical state.

    Args:
        criterion: the classification loss on the logits (CE).
        num_classes: C.
        proj_dim: P, the dimension of q, prototypes and queue.
        class_counts: training count per class (C,), for the prototype recalibration weights.
        lam: weight of ``L_pl`` (1 in METHODS.md).
        temperature, momentum, queue_size, fgsm_eps, recal_gamma: :class:`~ltcore.losses.ProCoLoss` settings.
        seed: seeds the initial prototypes and the initial weights of F and G (identical on every rank).
    """

    def __init__(
        self,
        *,
        criterion: nn.Module,
        num_classes: int,
        proj_dim: int,
        class_counts: Sequence[int],
        lam: float = 1.0,
        temperature: float = 0.1,
        momentum: float = 0.99,
        queue_size: int = 4096,
        fgsm_eps: float = 0.1,
        recal_gamma: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__(criterion)
        if lam < 0:
            raise ValueError(f"loss.proco_lambda must be >= 0, got {lam}")
        self.lam = float(lam)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.proco = ProCoLoss(num_classes, proj_dim, class_counts, temperature=temperature, momentum=momentum,
                               queue_size=queue_size, fgsm_eps=fgsm_eps, recal_gamma=recal_gamma, seed=seed)
        self.query_head: ProjectionMLP | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, model: nn.Module) -> None:
        """Install F as the model's neck (unless it has one: a resumed model) and build G, both seeded."""
        feat_dim = int(model.feat_dim)  # type: ignore[arg-type]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if getattr(model, "neck", None) is None:
                model.set_neck()  # type: ignore[operator]
            self.query_head = ProjectionMLP(feat_dim, feat_dim, self.proj_dim)

    def state_modules(self) -> nn.ModuleDict:
        if self.query_head is None:
            raise RuntimeError("ProCoRecipe.setup(model) must be called before state_modules()")
        return nn.ModuleDict({"criterion": self.criterion, "proco": self.proco, "query_head": self.query_head})

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.query_head is None:
            raise RuntimeError("ProCoRecipe.setup(model) must be called before loss()")
        y = batch["label"]
        out = model(batch["image"])
        h = require(out, "backbone_features", "proco", "the neck ProCoRecipe.setup installs")  # (N, D)
        ce = self.criterion(out["logits"], y)  # logits = head(F(h))
        with fp32(y.device):
            q = self.query_head(h.float())  # (N, P)
            k = q.detach()  # (N, P)
            l_pl = self.proco(q, k, y)
        self._pending = (gather_rows(k), gather_rows(y))
        return ce + self.lam * l_pl, {"ce": float(ce.detach()), "proco": float(l_pl.detach())}

    def after_step(self, model: nn.Module) -> None:
        if self._pending is not None:
            self.proco.update(*self._pending)
            self._pending = None


def build(*, loss_cfg: Any, class_counts: Sequence[int], proj_dim: int, **_: Any) -> Stage1Recipe:
    """``stage1.method=proco`` from config: ``loss.proco_*``, ``loss.temperature``; ``model.proj_dim`` sizes q."""
    return ProCoRecipe(criterion=ce_from_config(loss_cfg), num_classes=len(class_counts),
                       proj_dim=check_proj_dim("proco", proj_dim), class_counts=class_counts,
                       lam=loss_cfg.proco_lambda, temperature=loss_cfg.temperature, momentum=loss_cfg.proco_momentum,
                       queue_size=loss_cfg.proco_queue, fgsm_eps=loss_cfg.proco_eps, recal_gamma=loss_cfg.proco_gamma)
