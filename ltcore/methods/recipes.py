"""Stage-1 recipes by name (``stage1.method``): the baselines here, the five papers' in their own modules.

A recipe is a loss (and what it needs from the model and the data) built from explicit keyword arguments;
:func:`build_stage1` is the thin layer that reads config. The worker loop calls, per epoch,
``start_epoch(epoch)`` and, per batch, ``loss(model, batch, epoch)``. Recipes that need extra state
(prototypes, queues, teachers) keep it in ``state_modules()``, which the engine moves to the device and
checkpoints with the model (the full contract: :mod:`ltcore.methods._recipe`).

======================  ==================================================================================
name                    loss
======================  ==================================================================================
``ce``, ``focal``,      the baselines of METHODS.md (CE, focal, class-balanced CE / focal, LDAM, LDAM-DRW,
``cb_ce``, ...          balanced softmax, logit-adjusted CE), on the logits of one weak view
``proco``               ``CE(head(F(h))) + lambda * L_pl(G(h))`` (:mod:`.proco`; Yang, Pan et al., MICCAI 2022)
``metric``              ``CE + lambda * L_metric``, batch-hard triplet / class-centre triplet / SupCon
                        (:mod:`.metric`; Zeng et al., arXiv 2207.06975)
``jrcl``                ``CE + L_SCL(one-to-all) + L_BDC + CE_aux`` (:mod:`.jrcl`; Guan et al.)
``lmd_rrl``             ``CE + [epoch > rrl_start_epoch] * L_RRL`` against an EMA teacher (:mod:`.lmd_rrl`; LMD
                        stage 1, Pan et al., arXiv 2502.03238)
``spmix``               ``CE`` on SPMix images (:mod:`.spmix`; Wei et al., arXiv 2406.10801); any recipe
                        composes with SPMix through ``loss.spmix=true``
======================  ==================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
from ltcore.methods import jrcl, lmd_rrl, metric, proco, spmix
from ltcore.methods._recipe import Stage1Recipe

__all__ = ["STAGE1", "DRWRecipe", "RecipeBuilder", "Stage1Recipe", "build_stage1", "stage1_methods"]


class DRWRecipe(Stage1Recipe):
    """A loss whose class weights switch on at ``start_epoch`` (deferred re-weighting, Cao et al. 2019)."""

    def __init__(self, criterion: nn.Module, drw: DeferredReweighting) -> None:
        super().__init__(criterion)
        self.drw = drw

    def start_epoch(self, epoch: int) -> None:
        w = self.drw.weight(epoch)
        self.criterion.set_weight(w)  # type: ignore[operator]


RecipeBuilder = Callable[..., Stage1Recipe]


def _ce(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    return Stage1Recipe(CrossEntropyLoss(label_smoothing=loss_cfg.label_smoothing))


def _focal(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    return Stage1Recipe(FocalLoss(gamma=loss_cfg.focal_gamma))


def _cb_ce(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    w = class_balanced_weights(class_counts, beta=loss_cfg.cb_beta)
    return Stage1Recipe(CrossEntropyLoss(label_smoothing=loss_cfg.label_smoothing, weight=w))


def _cb_focal(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    w = class_balanced_weights(class_counts, beta=loss_cfg.cb_beta)
    return Stage1Recipe(FocalLoss(gamma=loss_cfg.focal_gamma, weight=w))


def _ldam_drw(*, loss_cfg: Any, class_counts: Sequence[int], epochs: int, **_: Any) -> Stage1Recipe:
    # DRW switches at T0 = drw_start * epochs (80% of epochs in Cao et al.).
    start = round(loss_cfg.drw_start * epochs)
    crit = LDAMLoss(class_counts, max_margin=loss_cfg.ldam_max_margin, s=loss_cfg.ldam_s)
    return DRWRecipe(crit, DeferredReweighting(class_counts, start_epoch=start, beta=loss_cfg.cb_beta))


def _ldam(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    return Stage1Recipe(LDAMLoss(class_counts, max_margin=loss_cfg.ldam_max_margin, s=loss_cfg.ldam_s))


def _bsm(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    return Stage1Recipe(BalancedSoftmaxLoss(class_counts))


def _la(*, loss_cfg: Any, class_counts: Sequence[int], **_: Any) -> Stage1Recipe:
    return Stage1Recipe(LogitAdjustedLoss(class_counts, tau=loss_cfg.la_tau))


#: every stage-1 recipe by config name; a builder takes keyword arguments and ignores those it does not need
STAGE1: dict[str, RecipeBuilder] = {
    "ce": _ce,
    "focal": _focal,
    "cb_ce": _cb_ce,
    "cb_focal": _cb_focal,
    "ldam_drw": _ldam_drw,
    "ldam": _ldam,
    "balanced_softmax": _bsm,
    "logit_adjusted": _la,
    "proco": proco.build,
    "metric": metric.build,
    "jrcl": jrcl.build,
    "lmd_rrl": lmd_rrl.build,
    "spmix": spmix.build,
}


def stage1_methods() -> list[str]:
    """Every stage-1 recipe name, sorted."""
    return sorted(STAGE1)


def build_stage1(method: str, **kwargs: Any) -> Stage1Recipe:
    """Build the named recipe. kwargs: loss_cfg, class_counts, classes, epochs, proj_dim (and seed).

    Raises:
        ValueError: on an unknown name, or what the recipe's builder refuses in the config.
    """
    if method not in STAGE1:
        raise ValueError(f"stage1.method {method!r} is not a recipe; choose one of {', '.join(stage1_methods())}")
    recipe = STAGE1[method](**kwargs)
    # Augmentations compose with any recipe (e.g. loss.spmix=true with jrcl).
    return spmix.with_augmentations(recipe, kwargs["loss_cfg"], seed=int(kwargs.get("seed", 0)))
