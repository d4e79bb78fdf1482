"""SPMix as a stage-1 recipe and as a wrapper around any recipe (Wei et al., arXiv 2406.10801; METHODS.md 5).

"Saliency-guided and Patch-based Mixup for Long-tailed Skin Cancer Image Classification": tail images (a
class-balanced stream) mixed patch-wise with head images (the instance stream), tail labels kept. The mixing
is :class:`~ltcore.augment.spmix.SPMix`; ``loss.spmix=true`` applies it to any recipe (:func:`with_augmentations`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ltcore.augment.spmix import SPMix
from ltcore.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ltcore.dist import rank
from ltcore.methods._recipe import Stage1Recipe, ce_from_config, fp32

__all__ = ["SPMixRecipe", "build", "with_augmentations"]


class SPMixRecipe(Stage1Recipe):
    """Any recipe trained on SPMix images: tail images mixed patch-wise with head images, tail labels kept.

    The batch carries ``image``/``label`` from the instance-sampled stream (the head images B) and
    ``tail_image``/``tail_label`` from a class-balanced stream (the tail images A, METHODS.md section 5). The
    wrapper hands the inner recipe a batch whose ``image`` is ``spmix(tail_image, image)`` and whose ``label`` is
    ``tail_label``; rows beyond the shorter of the two streams' batches are dropped. For a two-view inner
    recipe the tail stream must carry its second view ``tail_image2`` too: ``image2`` becomes
    ``spmix(tail_image2, image2)`` with the same per-sample decision to mix (the same random draw) and each
    view's own saliency, so both views still show the same (mixed) sample. Mixing runs in float32 with autocast
    off.

    Args:
        inner: the recipe that computes the loss.
        spmix: the mixer (alpha, patch, probability, saliency function).
        seed: the mixing draws are a function of ``(seed, epoch, rank)``.
    """

    needs_tail_stream = True

    def __init__(self, inner: Stage1Recipe, spmix: SPMix, seed: int = 0) -> None:
        super().__init__(inner.criterion)
        if isinstance(inner, SPMixRecipe):
            raise ValueError("SPMix is already applied; do not wrap an SPMixRecipe again")
        self.inner, self.spmix, self.seed = inner, spmix, int(seed)
        self.views = inner.views
        self.needs_projector = inner.needs_projector
        self.needs_aux_binary = inner.needs_aux_binary
        self.find_unused_parameters = inner.find_unused_parameters
        self.generator = torch.Generator()
        self._reseed(0)

    def setup(self, model: nn.Module) -> None:
        setup = getattr(self.inner, "setup", None)
        if setup is not None:
            setup(model)

    def state_modules(self) -> nn.ModuleDict:
        return self.inner.state_modules()

    def _reseed(self, epoch: int) -> None:
        seq = np.random.SeedSequence((self.seed, int(epoch), rank()))
        self.generator.manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))

    def start_epoch(self, epoch: int) -> None:
        self._reseed(epoch)
        self.inner.start_epoch(epoch)

    def mix(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inner recipe's batch: mixed ``image`` (and ``image2``), ``label = tail_label``, no ``tail_*`` keys."""
        for key in ("tail_image", "tail_label"):
            if key not in batch:
                raise ValueError(f"loss.spmix needs the class-balanced tail stream: the batch has no {key!r}")
        two = "image2" in batch and len(self.views) == 2
        if two and "tail_image2" not in batch:
            raise ValueError("a two-view recipe with loss.spmix needs the tail stream's second view 'tail_image2'")
        n = min(batch["tail_label"].shape[0], batch["label"].shape[0])
        out = {k: v[:n] for k, v in batch.items() if not k.startswith("tail_")}
        y_tail = batch["tail_label"][:n]
        device = batch["image"].device
        with fp32(device):
            state = self.generator.get_state()
            out["image"], out["label"] = self.spmix(batch["tail_image"][:n].float(), y_tail,
                                                    batch["image"][:n].float(), self.generator)
            if two:
                after = self.generator.get_state()
                self.generator.set_state(state)  # same draw: view 2 is mixed exactly where view 1 is
                out["image2"], _ = self.spmix(batch["tail_image2"][:n].float(), y_tail,
                                              batch["image2"][:n].float(), self.generator)
                self.generator.set_state(after)
        return out

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.inner.loss(model, self.mix(batch), epoch)

    def after_step(self, model: nn.Module) -> None:
        self.inner.after_step(model)


def _mixer(loss_cfg: Any) -> SPMix:
    # The engine hands recipes batches normalised with the ImageNet statistics (transforms.normalize_images);
    # SPMix undoes that for the saliency, which must see the image as it is.
    return SPMix(alpha=loss_cfg.spmix_alpha, patch=loss_cfg.spmix_patch, prob=loss_cfg.spmix_prob,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD)


def with_augmentations(recipe: Stage1Recipe, loss_cfg: Any, seed: int = 0) -> Stage1Recipe:
    """Wrap ``recipe`` in :class:`SPMixRecipe` when ``loss_cfg.spmix`` is true (and it is not wrapped already)."""
    if not loss_cfg.spmix or isinstance(recipe, SPMixRecipe):
        return recipe
    return SPMixRecipe(recipe, _mixer(loss_cfg), seed=seed)


def build(*, loss_cfg: Any, **kwargs: Any) -> Stage1Recipe:
    """SPMix with plain CE. **Interpretation**: the paper trains with GPaCo; we ship CE so that SPMix is
    compared with the other methods on the same loss (and composes with any of them via ``loss.spmix``)."""
    return SPMixRecipe(Stage1Recipe(ce_from_config(loss_cfg)), _mixer(loss_cfg), seed=int(kwargs.get("seed", 0)))
