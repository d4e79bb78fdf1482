"""Stage-1 recipes: a loss (and what it needs from the model and the data) selected by name from config.

A recipe is built from explicit keyword arguments; ``build_stage1`` is the thin layer that reads config.
The worker loop calls, per epoch, ``start_epoch(epoch)`` and, per batch, ``loss(model, batch, epoch)``.
Recipes that need extra state (prototypes, queues, teachers) keep it in ``state_modules()``, which the
engine moves to the device and checkpoints with the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ltcore.losses import (
    BalancedSoftmaxLoss,
    CrossEntropyLoss,
    DeferredReweighting,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    class_balanced_weights,
)


class Stage1Recipe:
    """Base recipe: plain supervised loss on the logits of one (weakly augmented) view."""

    #: ingest views (transform kinds) the recipe consumes; two entries give ``image`` and ``image2``.
    views: tuple[str, ...] = ("weak",)
    #: what the model must have: a projection head (dim > 0) and/or an auxiliary normal-vs-abnormal head.
    needs_projector: bool = False
    needs_aux_binary: bool = False
    #: an extra class-balanced stream (SPMix tail images).
    needs_tail_stream: bool = False
    #: some model parameters get no gradient in some steps (e.g. a loss term that starts at an epoch).
    find_unused_parameters: bool = False

    def __init__(self, criterion: nn.Module) -> None:
        self.criterion = criterion

    def setup(self, model: nn.Module) -> None:
        """Build state that depends on the model (second projectors, teachers); called before state_modules."""

    def state_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"criterion": self.criterion})

    def start_epoch(self, epoch: int) -> None:
        """Hook for per-epoch schedules (DRW, RRL switch)."""

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch["image"])
        loss = self.criterion(out["logits"], batch["label"])
        return loss, {}

    def after_step(self, model: nn.Module) -> None:
        """Hook after each optimiser step (EMA teachers)."""


class DRWRecipe(Stage1Recipe):
    """A loss whose class weights switch on at ``start_epoch`` (deferred re-weighting, Cao et al. 2019)."""

    def __init__(self, criterion: nn.Module, drw: DeferredReweighting) -> None:
        super().__init__(criterion)
        self.drw = drw

    def start_epoch(self, epoch: int) -> None:
        w = self.drw.weight(epoch)
        self.criterion.set_weight(w)  # type: ignore[operator]


RecipeBuilder = Callable[..., Stage1Recipe]
STAGE1: dict[str, RecipeBuilder] = {}


def register_stage1(name: str) -> Callable[[RecipeBuilder], RecipeBuilder]:
    def deco(fn: RecipeBuilder) -> RecipeBuilder:
        STAGE1[name] = fn
        return fn

    return deco


@register_stage1("ce")
def _ce(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    return Stage1Recipe(CrossEntropyLoss(label_smoothing=loss_cfg.label_smoothing))


@register_stage1("focal")
def _focal(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    return Stage1Recipe(FocalLoss(gamma=loss_cfg.focal_gamma))


@register_stage1("cb_ce")
def _cb_ce(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    w = class_balanced_weights(class_counts, beta=loss_cfg.cb_beta)
    return Stage1Recipe(CrossEntropyLoss(label_smoothing=loss_cfg.label_smoothing, weight=w))


@register_stage1("cb_focal")
def _cb_focal(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    w = class_balanced_weights(class_counts, beta=loss_cfg.cb_beta)
    return Stage1Recipe(FocalLoss(gamma=loss_cfg.focal_gamma, weight=w))


@register_stage1("ldam_drw")
def _ldam_drw(*, loss_cfg: Any, class_counts: Sequence[int], epochs: int, **_: Any) -> Stage1Recipe:
    # DRW switches at T0 = drw_start * epochs (80% of epochs in Cao et al.).
    start = round(loss_cfg.drw_start * epochs)
    crit = LDAMLoss(class_counts, max_margin=loss_cfg.ldam_max_margin, s=loss_cfg.ldam_s)
    return DRWRecipe(crit, DeferredReweighting(class_counts, start_epoch=start, beta=loss_cfg.cb_beta))


@register_stage1("ldam")
def _ldam(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    return Stage1Recipe(LDAMLoss(class_counts, max_margin=loss_cfg.ldam_max_margin, s=loss_cfg.ldam_s))


@register_stage1("balanced_softmax")
def _bsm(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    return Stage1Recipe(BalancedSoftmaxLoss(class_counts))


@register_stage1("logit_adjusted")
def _la(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    return Stage1Recipe(LogitAdjustedLoss(class_counts, tau=loss_cfg.la_tau))


def stage1_methods() -> list[str]:
    """Every registered stage-1 recipe name (the baselines here and the papers' in ``paper_recipes``)."""
    from ltcore.methods import paper_recipes  # noqa: F401 - registers the five papers' recipes

    return sorted(STAGE1)


def build_stage1(method: str, **kwargs: Any) -> Stage1Recipe:
    """Build the named recipe. kwargs: loss_cfg, class_counts, classes, epochs, feat_dim, proj_dim."""
    from ltcore.methods import paper_recipes

    if method not in stage1_methods():
        raise ValueError(f"stage1.method {method!r} is not a recipe; choose one of {', '.join(sorted(STAGE1))}")
    recipe = STAGE1[method](**kwargs)
    # Augmentations compose with any recipe (e.g. loss.spmix=true with jrcl).
    return paper_recipes.with_augmentations(recipe, kwargs["loss_cfg"], seed=int(kwargs.get("seed", 0)))
