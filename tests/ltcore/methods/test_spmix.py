from __future__ import annotations

import pytest
import torch
from torch import nn

from ltcore.augment.spmix import SPMix
from ltcore.methods.recipes import Stage1Recipe
from ltcore.methods.spmix import SPMixRecipe, with_augmentations


class _Spy(Stage1Recipe):
    views = ("weak", "weak")

    def __init__(self) -> None:
        super().__init__(nn.CrossEntropyLoss())
        self.seen: dict[str, torch.Tensor] = {}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict]:
        self.seen = batch
        return torch.zeros(()), {}


def test_spmix_wrapper_feeds_tail_labels_and_mixed_images(toy) -> None:
    spy = _Spy()
    recipe = SPMixRecipe(spy, SPMix(alpha=0.8, patch=4, prob=1.0), seed=0)
    assert recipe.needs_tail_stream and recipe.views == ("weak", "weak")
    batch = toy.batch(tail=True)
    batch["tail_label"] = batch["tail_label"][:10]  # a shorter tail batch: both are cut to 10 rows
    recipe.loss(nn.Identity(), batch, 0)
    seen = spy.seen
    assert set(seen) == {"image", "image2", "label"}
    torch.testing.assert_close(seen["label"], batch["tail_label"][:10])
    for view, tail in (("image", "tail_image"), ("image2", "tail_image2")):
        x = seen[view]
        assert x.shape == (10, 3, toy.size, toy.size)
        # every pixel is r * tail + (1 - r) * head with r in [0.5, 0.8] (scores in [0.5, 1], capped at alpha)
        head, t = batch[view][:10], batch[tail][:10]
        r = (x - head) / (t - head)
        ok = (t - head).abs() > 1e-3
        assert bool(((r[ok] > 0.5 - 1e-4) & (r[ok] < 0.8 + 1e-4)).all())


def test_spmix_two_views_mixed_with_the_same_draw(toy) -> None:
    spy = _Spy()
    recipe = SPMixRecipe(spy, SPMix(alpha=0.8, patch=4, prob=0.5), seed=3)
    batch = toy.batch(tail=True)
    recipe.loss(nn.Identity(), batch, 0)
    mixed1 = ~torch.isclose(spy.seen["image"], batch["tail_image"]).flatten(1).all(1)
    mixed2 = ~torch.isclose(spy.seen["image2"], batch["tail_image2"]).flatten(1).all(1)
    assert 0 < int(mixed1.sum()) < 12
    torch.testing.assert_close(mixed1, mixed2)


def test_spmix_reproducible_per_epoch(toy) -> None:
    batch = toy.batch(tail=True)
    outs = []
    for epoch in (0, 0, 1):
        spy = _Spy()
        recipe = SPMixRecipe(spy, SPMix(alpha=0.8, patch=4, prob=0.5), seed=0)
        recipe.start_epoch(epoch)
        recipe.loss(nn.Identity(), batch, epoch)
        outs.append(spy.seen["image"])
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_spmix_recipes_compute_saliency_on_unnormalised_images(toy) -> None:
    # the engine normalises batches with the ImageNet statistics; the mixers undo that for the saliency
    for recipe in (toy.build("spmix"), toy.build("jrcl", spmix=True)):
        assert isinstance(recipe, SPMixRecipe)
        assert recipe.spmix.mean == (0.485, 0.456, 0.406) and recipe.spmix.std == (0.229, 0.224, 0.225)


def test_spmix_missing_tail_stream(toy) -> None:
    recipe = SPMixRecipe(_Spy(), SPMix(patch=4), seed=0)
    with pytest.raises(ValueError, match="tail_image"):
        recipe.loss(nn.Identity(), toy.batch(), 0)
    batch = toy.batch(tail=True)
    del batch["tail_image2"]
    with pytest.raises(ValueError, match="tail_image2"):
        recipe.loss(nn.Identity(), batch, 0)


def test_with_augmentations_composes(toy) -> None:
    jrcl = toy.build("jrcl")
    assert with_augmentations(jrcl, toy.cfg(spmix=False)) is jrcl
    wrapped = with_augmentations(jrcl, toy.cfg(spmix=True, spmix_patch=4))
    assert isinstance(wrapped, SPMixRecipe) and wrapped.inner is jrcl
    assert wrapped.needs_tail_stream and wrapped.needs_projector and wrapped.needs_aux_binary
    assert wrapped.views == ("weak", "weak")
    assert with_augmentations(wrapped, toy.cfg(spmix=True)) is wrapped  # never wrapped twice
    # and it trains: JRCL on SPMix images, tail labels
    model = toy.model(wrapped)
    wrapped.setup(model)
    first, last = toy.train(wrapped, model, toy.batch(tail=True), steps=15)
    assert last < first


