from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltcore.methods.proco import ProCoRecipe


def test_proco_needs_setup_and_updates_state_after_step(toy) -> None:
    recipe = toy.build("proco", proco_queue=32)
    assert isinstance(recipe, ProCoRecipe)
    with pytest.raises(RuntimeError, match="setup"):
        recipe.state_modules()
    model = toy.model(recipe)
    recipe.setup(model)
    extra = recipe.state_modules()
    assert any(p.requires_grad for p in extra["query_head"].parameters())
    batch = toy.batch()
    recipe.loss(model, batch, 0)
    assert int(recipe.proco.queue_ptr) == 0  # nothing changes before the optimiser step
    recipe.after_step(model)
    assert int(recipe.proco.queue_ptr) == 12  # 12 keys enqueued
    assert bool(recipe.proco.proto_initialised.all())
    # the keys are the (normalised) queries q = G(h) of the batch, h the backbone features before the neck F
    with torch.no_grad():
        q = extra["query_head"](model.backbone(batch["image"]))
    torch.testing.assert_close(recipe.proco.queue_keys[:12], F.normalize(q, dim=1))
    torch.testing.assert_close(recipe.proco.queue_labels[:12], batch["label"])


def test_proco_classifier_reads_f_and_f_learns_through_ce(toy) -> None:
    recipe = toy.build("proco", proco_lambda=0.0)  # CE alone: F (the neck) must still get a gradient
    assert isinstance(recipe, ProCoRecipe) and not recipe.needs_projector
    model = toy.model(recipe)
    recipe.setup(model)
    assert model.neck is not None
    batch = toy.batch()
    loss, logs = recipe.loss(model, batch, 0)
    with torch.no_grad():
        h = model.backbone(batch["image"])
        ce_f = F.cross_entropy(model.head(model.neck(h)), batch["label"])  # CE(classifier(F(h)))
        ce_h = F.cross_entropy(model.head(h), batch["label"])  # the old, wrong CE on h
    assert logs["ce"] == pytest.approx(float(ce_f), rel=1e-6)
    assert abs(float(ce_f) - float(ce_h)) > 1e-3
    loss.backward()
    for p in model.neck.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_proco_checkpoint_loads_into_a_model_built_without_the_neck(toy) -> None:
    # Evaluation and stage 2 build the model from the checkpoint's meta, without running the recipe's setup:
    # the neck must come back from the state dict, and prediction must go through it.
    recipe = toy.build("proco")
    model = toy.model(recipe)
    recipe.setup(model)
    fresh = toy.model(recipe, seed=1)
    assert fresh.neck is None
    fresh.load_state_dict(model.state_dict())
    x = toy.batch()["image"]
    with torch.no_grad():
        torch.testing.assert_close(fresh.classify(fresh.forward_features(x)), model(x)["logits"])
        torch.testing.assert_close(fresh.forward_features(x), model.neck(model.backbone(x)))  # type: ignore[misc]


