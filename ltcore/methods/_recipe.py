"""The stage-1 recipe base class and the bits the papers' recipes share (re-exported by :mod:`.recipes`).

A recipe is a loss (and what it needs from the model and the data) selected by name from config; it is built
from explicit keyword arguments, and a ``build`` function per recipe module reads the config.

Engine contract, per run: ``setup(model)`` once with the freshly built :class:`~ltcore.models.LTModel` and
before ``state_modules()`` (ProCo installs its projector F in the model and builds G from ``model.feat_dim``;
LMD copies the model into its teacher); ``state_modules()`` is moved to the device, checkpointed and (for
learnable parts) optimised and all-reduced with the model; per epoch ``start_epoch(epoch)``; per batch
``loss(model, batch, epoch)``, the optimiser step, then ``after_step(model)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ltcore.losses import CrossEntropyLoss


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


class PaperRecipe(Stage1Recipe):
    """Base of the papers' recipes: DDP without the unused-parameter search.

    Their own learnable modules (ProCo's projector G, JRCL's class centres) are used *outside* the DDP forward.
    DDP allows that only with ``find_unused_parameters=False`` (with ``True`` it fails with "Expected to mark a
    variable ready only once"), so each of these recipes makes every trainable parameter take part in every
    step's loss (a test checks that each gets a non-zero gradient).
    """

    find_unused_parameters = False


@contextmanager
def fp32(device: torch.device) -> Iterator[None]:
    """Autocast off for the block (the caller casts its inputs with ``.float()``).

    Contrastive and relation terms run in float32: they exponentiate similarities divided by small
    temperatures, and the FGSM / Cholesky steps need full precision.
    """
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def ce_from_config(loss_cfg: Any) -> nn.Module:
    """The classification CE every paper's recipe adds (label smoothing from ``loss.label_smoothing``)."""
    return CrossEntropyLoss(label_smoothing=loss_cfg.label_smoothing)


def check_proj_dim(method: str, proj_dim: int) -> int:
    """``proj_dim`` as an int.

    Raises:
        ValueError: if it is < 1 (the recipe trains a projection).
    """
    if proj_dim < 1:
        raise ValueError(f"model.proj_dim must be >= 1 for stage1.method={method!r} (it trains a projection), "
                         f"got {proj_dim}")
    return int(proj_dim)


def two_views(batch: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    """``image`` and ``image2`` stacked into one batch ``(2N, C, H, W)`` (one forward, shared BN statistics).

    Raises:
        ValueError: if the batch has no ``image2``.
    """
    if "image2" not in batch:
        raise ValueError(f"stage1.method={method!r} needs two views: the batch must carry 'image2' "
                         "(ingest with the recipe's views)")
    return torch.cat([batch["image"], batch["image2"]], dim=0)


def require(out: dict[str, torch.Tensor], key: str, method: str, what: str) -> torch.Tensor:
    """``out[key]``.

    Raises:
        ValueError: naming what to build the model with, if the model's output has no ``key``.
    """
    if key not in out:
        raise ValueError(f"stage1.method={method!r} needs the model's {key!r} output; build the model with {what}")
    return out[key]
