from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltcore.augment.spmix import SPMix
from ltcore.config import ConfigError, LossConfig, from_dict, load_config, to_dict
from ltcore.methods import paper_recipes as pr
from ltcore.methods.recipes import STAGE1, Stage1Recipe, build_stage1, stage1_methods
from ltcore.models import LTModel, build_model

CLASSES = ["a", "b", "c"]
COUNTS = [6, 3, 2]
SIZE = 8  # 8 x 8 images, SPMix patch 4


def _cfg(**kw: object) -> LossConfig:
    kw.setdefault("normal_class", "a")  # CLASSES has no 'nv', the config default
    return dataclasses.replace(LossConfig(), **kw)  # type: ignore[arg-type]


def _build(name: str, **kw: object) -> Stage1Recipe:
    return build_stage1(name, loss_cfg=_cfg(**kw), class_counts=COUNTS, classes=CLASSES, epochs=10, proj_dim=8)


def _mlp_model(recipe: Stage1Recipe, seed: int = 0) -> LTModel:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 32), nn.ReLU(), nn.Linear(32, 16))
    return LTModel(backbone, 16, 3, proj_dim=8 if recipe.needs_projector else 0,
                   aux_binary=recipe.needs_aux_binary)


def _toy_batch(per_class: int = 4, seed: int = 0, tail: bool = False) -> dict[str, torch.Tensor]:
    """3 classes, each a different mean image plus noise; two views (two noise draws)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(per_class)  # (3 * per_class,)
    means = torch.randn(3, 3, SIZE, SIZE, generator=g)

    def view() -> torch.Tensor:
        return means[y] + 0.3 * torch.randn(y.shape[0], 3, SIZE, SIZE, generator=g)

    batch = {"image": view(), "image2": view(), "label": y}
    if tail:
        yt = y.flip(0)
        batch.update({"tail_image": means[yt] + 0.3 * torch.randn(y.shape[0], 3, SIZE, SIZE, generator=g),
                      "tail_image2": means[yt] + 0.3 * torch.randn(y.shape[0], 3, SIZE, SIZE, generator=g),
                      "tail_label": yt})
    return batch


def _params(model: nn.Module, recipe: Stage1Recipe) -> list[nn.Parameter]:
    both = nn.ModuleDict({"model": model, "extra": recipe.state_modules()})
    return [p for p in both.parameters() if p.requires_grad]


def _train(recipe: Stage1Recipe, model: nn.Module, batch: dict[str, torch.Tensor], steps: int, epoch: int = 0,
           lr: float = 0.05) -> tuple[float, float]:
    """Loss before and after ``steps`` SGD steps on one fixed batch (the engine's order of calls)."""
    recipe.start_epoch(epoch)
    opt = torch.optim.SGD(_params(model, recipe), lr=lr, momentum=0.9)
    first = None
    for _ in range(steps):
        loss, logs = recipe.loss(model, batch, epoch)
        assert torch.isfinite(loss)
        assert all(math.isfinite(v) for v in logs.values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recipe.after_step(model)
    with torch.no_grad():
        last, _ = recipe.loss(model, batch, epoch)
    assert first is not None
    return first, float(last)


RECIPES = [
    ("proco", {}),
    ("metric", {"metric_loss": "triplet"}),
    ("metric", {"metric_loss": "centre_triplet"}),
    ("metric", {"metric_loss": "supcon"}),
    ("jrcl", {"normal_class": "a"}),
    # relation terms on from epoch 0; the channel term (weight 10) has gradients of norm ~100 on this untrained
    # toy model, so it trains with a smaller step (LMD itself uses lr 0.01)
    ("lmd_rrl", {"rrl_start_epoch": -1, "lr": 0.002}),
    ("spmix", {"spmix_patch": 4}),
]


@pytest.mark.parametrize(("name", "kw"), RECIPES, ids=[f"{n}-{kw.get('metric_loss', '')}" for n, kw in RECIPES])
def test_recipe_trains_on_toy_batch(name: str, kw: dict[str, object]) -> None:
    kw = dict(kw)
    lr = float(kw.pop("lr", 0.05))  # type: ignore[arg-type]
    recipe = _build(name, **kw)
    model = _mlp_model(recipe)
    recipe.setup(model)  # type: ignore[attr-defined]
    batch = _toy_batch(tail=recipe.needs_tail_stream)
    # every trainable parameter (model and recipe) gets a finite gradient: DDP runs with find_unused_parameters=False
    loss, _ = recipe.loss(model, batch, 0)
    loss.backward()
    for p in _params(model, recipe):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    model.zero_grad(set_to_none=True)
    first, last = _train(recipe, model, batch, steps=15, lr=lr)
    assert last < first


# every registered stage-1 recipe, with the settings that switch all of its terms on
GRAD_CASES = [(name, {}) for name in stage1_methods() if name not in ("metric", "lmd_rrl", "spmix")] + [
    ("metric", {"metric_loss": "triplet"}),
    ("metric", {"metric_loss": "centre_triplet"}),
    ("metric", {"metric_loss": "supcon"}),
    ("lmd_rrl", {"rrl_start_epoch": -1}),
    ("spmix", {"spmix_patch": 4, "spmix_prob": 1.0}),
    ("jrcl", {"spmix": True, "spmix_patch": 4, "spmix_prob": 1.0}),  # a recipe composed with SPMix
]


def test_grad_cases_cover_every_registered_recipe() -> None:
    assert {name for name, _ in GRAD_CASES} == set(stage1_methods())


@pytest.mark.parametrize(("name", "kw"), GRAD_CASES,
                         ids=[f"{n}-{'-'.join(map(str, kw.values()))}" for n, kw in GRAD_CASES])
def test_every_trainable_parameter_gets_a_nonzero_gradient(name: str, kw: dict[str, object]) -> None:
    # A module that is in the optimiser but outside the loss (a dead projector) has an exactly zero gradient.
    recipe = _build(name, **kw)
    model = _mlp_model(recipe)
    recipe.setup(model)
    batch = _toy_batch(tail=recipe.needs_tail_stream)
    recipe.start_epoch(9)  # the last epoch of 10: DRW weights on
    loss, _ = recipe.loss(model, batch, 9)
    loss.backward()
    named = dict(nn.ModuleDict({"model": model, "extra": recipe.state_modules()}).named_parameters())
    trainable = {k: p for k, p in named.items() if p.requires_grad}
    assert trainable
    dead = [k for k, p in trainable.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"{name}: no gradient reaches {dead}"


def test_registry_names_and_requirements() -> None:
    for name in ("proco", "metric", "jrcl", "lmd_rrl", "spmix"):
        assert name in STAGE1
    assert _build("metric", metric_loss="supcon").views == ("weak", "weak")
    assert _build("metric", metric_loss="triplet").views == ("weak",)
    jrcl = _build("jrcl")
    assert jrcl.needs_projector and jrcl.needs_aux_binary and jrcl.views == ("weak", "weak")
    assert _build("lmd_rrl").views == ("resize_flip", "strong")  # teacher: resize + flips; student: strong
    assert _build("spmix").needs_tail_stream
    for name in ("proco", "metric", "jrcl", "lmd_rrl", "spmix"):
        assert not _build(name).find_unused_parameters


def test_jrcl_unknown_normal_class() -> None:
    msg = r"loss.normal_class 'nv' is not a class of this dataset; choose one of a, b, c"
    with pytest.raises(ValueError, match=msg):
        _build("jrcl", normal_class="nv")


def test_jrcl_normal_index_and_terms() -> None:
    recipe = _build("jrcl", normal_class="b")
    assert isinstance(recipe, pr.JRCLRecipe) and recipe.normal_index == 1
    model = _mlp_model(recipe)
    batch = _toy_batch()
    loss, logs = recipe.loss(model, batch, 0)
    # the four terms add up to the loss
    assert float(loss.detach()) == pytest.approx(logs["ce"] + logs["scl"] + logs["bdc"] + logs["aux_ce"], rel=1e-5)


def test_metric_supcon_value_is_ce_plus_supcon() -> None:
    recipe = _build("metric", metric_loss="supcon", metric_lambda=0.5)
    model = _mlp_model(recipe)
    batch = _toy_batch()
    loss, _ = recipe.loss(model, batch, 0)
    with torch.no_grad():
        out = model(torch.cat([batch["image"], batch["image2"]]))
        n = batch["label"].shape[0]
        ce = F.cross_entropy(out["logits"][:n], batch["label"])
        z = torch.stack([out["embedding"][:n], out["embedding"][n:]], dim=1)
        sc = pr.SupConLoss(temperature=0.1)(z, batch["label"])
    assert float(loss.detach()) == pytest.approx(float(ce + 0.5 * sc), rel=1e-5)


@pytest.mark.parametrize(("metric", "lam"), [("triplet", 0.03), ("centre_triplet", 0.07), ("supcon", 1.0)])
def test_metric_lambda_default_per_loss_and_user_value_wins(metric: str, lam: float) -> None:
    recipe = _build("metric", metric_loss=metric)  # metric_lambda left at its default, "auto"
    assert isinstance(recipe, pr.MetricRecipe) and recipe.lam == lam
    for user in (0.5, 1.0, 0.0):  # any value the user sets wins, 1.0 included
        recipe = _build("metric", metric_loss=metric, metric_lambda=user)
        assert isinstance(recipe, pr.MetricRecipe) and recipe.lam == user


def test_metric_triplet_default_value_is_ce_plus_0_03_triplet() -> None:
    recipe = _build("metric", metric_loss="triplet")
    model = _mlp_model(recipe)
    batch = _toy_batch()
    loss, _ = recipe.loss(model, batch, 0)
    with torch.no_grad():
        out = model(batch["image"])
        ce = F.cross_entropy(out["logits"], batch["label"])
        tri = pr.BatchHardTripletLoss(margin=0.2)(out["embedding"], batch["label"])
    assert float(tri) > 0.1  # a live term, so a wrong weight shows
    assert float(loss.detach()) == pytest.approx(float(ce + 0.03 * tri), rel=1e-5)


def test_shipped_metric_configs_mean_what_they_say() -> None:
    # ham10000_metric.yaml: "SupCon, lambda 1.0, tau 0.1"
    repo = Path(__file__).resolve().parents[3]
    cfg = load_config(str(repo / "ltcore/configs/ham10000_metric.yaml"))
    loss = cfg.stage1.loss
    assert (cfg.stage1.method, loss.metric_loss, loss.metric_lambda, loss.temperature) == ("metric", "supcon", 1.0, 0.1)
    # "auto" and numbers both parse from overrides and survive the saved-config round trip
    for text, value in (("auto", "auto"), ("0.03", 0.03)):
        cfg = load_config(str(repo / "ltcore/configs/ham10000_metric.yaml"),
                          [f"stage1.loss.metric_lambda={text}", "stage1.loss.metric_loss=triplet"])
        assert cfg.stage1.loss.metric_lambda == value
        assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="metric_lambda"):
        load_config(None, ["stage1.loss.metric_lambda=large"])


def test_two_view_recipe_needs_image2() -> None:
    recipe = _build("jrcl")
    batch = _toy_batch()
    del batch["image2"]
    with pytest.raises(ValueError, match="image2"):
        recipe.loss(_mlp_model(recipe), batch, 0)


# ------------------------------------------------------------------------------------------------ ProCo


def test_proco_needs_setup_and_updates_state_after_step() -> None:
    recipe = _build("proco", proco_queue=32)
    assert isinstance(recipe, pr.ProCoRecipe)
    with pytest.raises(RuntimeError, match="setup"):
        recipe.state_modules()
    model = _mlp_model(recipe)
    recipe.setup(model)
    extra = recipe.state_modules()
    assert any(p.requires_grad for p in extra["query_head"].parameters())
    batch = _toy_batch()
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


def test_proco_classifier_reads_f_and_f_learns_through_ce() -> None:
    recipe = _build("proco", proco_lambda=0.0)  # CE alone: F (the neck) must still get a gradient
    assert isinstance(recipe, pr.ProCoRecipe) and not recipe.needs_projector
    model = _mlp_model(recipe)
    recipe.setup(model)
    assert model.neck is not None
    batch = _toy_batch()
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


def test_proco_checkpoint_loads_into_a_model_built_without_the_neck() -> None:
    # Evaluation and stage 2 build the model from the checkpoint's meta, without running the recipe's setup:
    # the neck must come back from the state dict, and prediction must go through it.
    recipe = _build("proco")
    model = _mlp_model(recipe)
    recipe.setup(model)
    fresh = _mlp_model(recipe, seed=1)
    assert fresh.neck is None
    fresh.load_state_dict(model.state_dict())
    x = _toy_batch()["image"]
    with torch.no_grad():
        torch.testing.assert_close(fresh.classify(fresh.forward_features(x)), model(x)["logits"])
        torch.testing.assert_close(fresh.forward_features(x), model.neck(model.backbone(x)))  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ LMD


def test_lmd_rrl_terms_off_before_start_epoch() -> None:
    recipe = _build("lmd_rrl", rrl_start_epoch=2)
    model = _mlp_model(recipe)
    recipe.setup(model)  # type: ignore[attr-defined]
    batch = _toy_batch()
    for epoch in (0, 1, 2):  # [epoch > 2] is off
        loss, logs = recipe.loss(model, batch, epoch)
        assert logs["rrl_prob"] == logs["rrl_batch"] == logs["rrl_chan"] == 0.0
        # the loss is the student's CE on the strong view image2
        expected = F.cross_entropy(model(batch["image2"])["logits"], batch["label"])
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    _, logs = recipe.loss(model, batch, 3)
    assert logs["rrl_prob"] > 0 and logs["rrl_batch"] > 0 and logs["rrl_chan"] > 0


def test_lmd_rrl_channel_scale_from_config() -> None:
    recipe = _build("lmd_rrl")
    assert isinstance(recipe, pr.LMDRRLRecipe) and recipe.relation.chan_norm == "dim"  # the default
    recipe = _build("lmd_rrl", rrl_chan_norm="batch")
    assert isinstance(recipe, pr.LMDRRLRecipe) and recipe.relation.chan_norm == "batch"


def test_lmd_rrl_teacher_equal_student_gives_zero_relation_terms() -> None:
    recipe = _build("lmd_rrl", rrl_start_epoch=-1)
    model = _mlp_model(recipe)
    recipe.setup(model)  # type: ignore[attr-defined]
    batch = _toy_batch()
    batch["image2"] = batch["image"]  # same input for teacher and student
    loss, logs = recipe.loss(model, batch, 0)
    assert logs["rrl_prob"] == pytest.approx(0.0, abs=1e-6)
    assert logs["rrl_batch"] == pytest.approx(0.0, abs=1e-6)
    assert logs["rrl_chan"] == pytest.approx(0.0, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(logs["ce"], abs=1e-5)


def test_lmd_rrl_teacher_is_frozen_checkpointed_and_ema() -> None:
    recipe = _build("lmd_rrl", rrl_start_epoch=-1)
    assert isinstance(recipe, pr.LMDRRLRecipe)
    model = _mlp_model(recipe)
    recipe.setup(model)
    extra = recipe.state_modules()
    assert not any(p.requires_grad for p in extra["teacher"].parameters())  # the optimiser skips it
    assert "counter.step" in extra.state_dict() and any(k.startswith("teacher.") for k in extra.state_dict())
    batch = _toy_batch()
    opt = torch.optim.SGD(_params(model, recipe), lr=0.1)
    for step in range(3):
        loss, _ = recipe.loss(model, batch, 0)
        opt.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in recipe.teacher.parameters()]  # type: ignore[union-attr]
        opt.step()
        recipe.after_step(model)
        alpha = min(1 - 1 / (step + 1), 0.999)  # 0, 1/2, 2/3
        for t, t0, s in zip(recipe.teacher.parameters(), before, model.parameters()):  # type: ignore[union-attr]
            torch.testing.assert_close(t, alpha * t0 + (1 - alpha) * s.detach())
    assert int(recipe.counter.step) == 3


# ------------------------------------------------------------------------------------------------ SPMix


class _Spy(Stage1Recipe):
    views = ("weak", "weak")

    def __init__(self) -> None:
        super().__init__(nn.CrossEntropyLoss())
        self.seen: dict[str, torch.Tensor] = {}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict]:
        self.seen = batch
        return torch.zeros(()), {}


def test_spmix_wrapper_feeds_tail_labels_and_mixed_images() -> None:
    spy = _Spy()
    recipe = pr.SPMixRecipe(spy, SPMix(alpha=0.8, patch=4, prob=1.0), seed=0)
    assert recipe.needs_tail_stream and recipe.views == ("weak", "weak")
    batch = _toy_batch(tail=True)
    batch["tail_label"] = batch["tail_label"][:10]  # a shorter tail batch: both are cut to 10 rows
    recipe.loss(nn.Identity(), batch, 0)
    seen = spy.seen
    assert set(seen) == {"image", "image2", "label"}
    torch.testing.assert_close(seen["label"], batch["tail_label"][:10])
    for view, tail in (("image", "tail_image"), ("image2", "tail_image2")):
        x = seen[view]
        assert x.shape == (10, 3, SIZE, SIZE)
        # every pixel is r * tail + (1 - r) * head with r in [0.5, 0.8] (scores in [0.5, 1], capped at alpha)
        head, t = batch[view][:10], batch[tail][:10]
        r = (x - head) / (t - head)
        ok = (t - head).abs() > 1e-3
        assert bool(((r[ok] > 0.5 - 1e-4) & (r[ok] < 0.8 + 1e-4)).all())


def test_spmix_two_views_mixed_with_the_same_draw() -> None:
    spy = _Spy()
    recipe = pr.SPMixRecipe(spy, SPMix(alpha=0.8, patch=4, prob=0.5), seed=3)
    batch = _toy_batch(tail=True)
    recipe.loss(nn.Identity(), batch, 0)
    mixed1 = ~torch.isclose(spy.seen["image"], batch["tail_image"]).flatten(1).all(1)
    mixed2 = ~torch.isclose(spy.seen["image2"], batch["tail_image2"]).flatten(1).all(1)
    assert 0 < int(mixed1.sum()) < 12
    torch.testing.assert_close(mixed1, mixed2)


def test_spmix_reproducible_per_epoch() -> None:
    batch = _toy_batch(tail=True)
    outs = []
    for epoch in (0, 0, 1):
        spy = _Spy()
        recipe = pr.SPMixRecipe(spy, SPMix(alpha=0.8, patch=4, prob=0.5), seed=0)
        recipe.start_epoch(epoch)
        recipe.loss(nn.Identity(), batch, epoch)
        outs.append(spy.seen["image"])
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_spmix_recipes_compute_saliency_on_unnormalised_images() -> None:
    # the engine normalises batches with the ImageNet statistics; the mixers undo that for the saliency
    for recipe in (_build("spmix"), _build("jrcl", spmix=True)):
        assert isinstance(recipe, pr.SPMixRecipe)
        assert recipe.spmix.mean == (0.485, 0.456, 0.406) and recipe.spmix.std == (0.229, 0.224, 0.225)


def test_spmix_missing_tail_stream() -> None:
    recipe = pr.SPMixRecipe(_Spy(), SPMix(patch=4), seed=0)
    with pytest.raises(ValueError, match="tail_image"):
        recipe.loss(nn.Identity(), _toy_batch(), 0)
    batch = _toy_batch(tail=True)
    del batch["tail_image2"]
    with pytest.raises(ValueError, match="tail_image2"):
        recipe.loss(nn.Identity(), batch, 0)


def test_with_augmentations_composes() -> None:
    jrcl = _build("jrcl")
    assert pr.with_augmentations(jrcl, _cfg(spmix=False)) is jrcl
    wrapped = pr.with_augmentations(jrcl, _cfg(spmix=True, spmix_patch=4))
    assert isinstance(wrapped, pr.SPMixRecipe) and wrapped.inner is jrcl
    assert wrapped.needs_tail_stream and wrapped.needs_projector and wrapped.needs_aux_binary
    assert wrapped.views == ("weak", "weak")
    assert pr.with_augmentations(wrapped, _cfg(spmix=True)) is wrapped  # never wrapped twice
    # and it trains: JRCL on SPMix images, tail labels
    model = _mlp_model(wrapped)
    wrapped.setup(model)
    first, last = _train(wrapped, model, _toy_batch(tail=True), steps=15)
    assert last < first


# ------------------------------------------------------------------------------------------------ small_cnn


@pytest.mark.parametrize("name", ["jrcl", "lmd_rrl"])
def test_recipes_on_small_cnn(name: str) -> None:
    recipe = _build(name, rrl_start_epoch=-1)
    torch.manual_seed(0)
    model = build_model(num_classes=3, backbone="small_cnn", proj_dim=8 if recipe.needs_projector else 0,
                        aux_binary=recipe.needs_aux_binary)
    recipe.setup(model)  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(6, 3, 16, 16, generator=g), "image2": torch.randn(6, 3, 16, 16, generator=g),
             "label": torch.tensor([0, 0, 1, 1, 2, 2])}
    model.train()
    loss, _ = recipe.loss(model, batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gather_rows_single_process_is_identity() -> None:
    t = torch.randn(3, 2, requires_grad=True)
    assert pr.gather_rows(t, differentiable=True) is t
    assert not pr.gather_rows(t).requires_grad


# ------------------------------------------------------------------------------------------------ DDP (gloo)

_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch import nn
    from ltcore.config import LossConfig
    from ltcore.methods import paper_recipes as pr
    from ltcore.methods.recipes import build_stage1
    from ltcore.models import LTModel

    class Wrap(nn.Module):  # the engine's TrainModule
        def __init__(self, model, extra):
            super().__init__(); self.model = model; self.extra = extra
        def forward(self, x):
            return self.model(x)

    def make(name, **kw):
        cfg = LossConfig(normal_class="a", rrl_start_epoch=-1, proco_queue=16, **kw)
        recipe = build_stage1(name, loss_cfg=cfg, class_counts=[4, 3, 3], classes=["a", "b", "c"], epochs=1,
                              proj_dim=4)
        torch.manual_seed(0)
        bb = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6))
        model = LTModel(bb, 6, 3, proj_dim=4 if recipe.needs_projector else 0, aux_binary=recipe.needs_aux_binary)
        recipe.setup(model)
        return recipe, model

    def data():
        g = torch.Generator().manual_seed(1)
        return {"image": torch.randn(10, 3, 2, 2, generator=g), "image2": torch.randn(10, 3, 2, 2, generator=g),
                "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])}

    def run(rank, world, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        res = {}
        # 1. uneven gather, differentiable: grad of sum(w * gathered) is w restricted to this rank's rows
        t = torch.full((2 + rank, 1), float(rank), requires_grad=True)
        g = pr.gather_rows(t, differentiable=True)
        (g.squeeze(1) * torch.arange(float(g.shape[0]))).sum().backward()
        res["gather"] = g.detach().squeeze(1).tolist()
        res["gather_grad"] = t.grad.squeeze(1).tolist()
        # 2. recipes under DDP with find_unused_parameters=False; rank r takes rows r*5 .. r*5+4
        full = data()
        part = {k: v[rank * 5:(rank + 1) * 5] for k, v in full.items()}
        for name in ("lmd_rrl", "proco", "jrcl"):
            recipe, model = make(name)
            ddp = nn.parallel.DistributedDataParallel(Wrap(model, recipe.state_modules()),
                                                      find_unused_parameters=False)
            loss, _ = recipe.loss(ddp, part, 0)
            loss.backward()
            recipe.after_step(model)
            res[name + "_grad"] = [p.grad.clone() for p in model.parameters()]
            if name == "proco":
                res["queue"] = recipe.proco.queue_keys.clone()
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ddp_gather_and_recipes_match_single_process(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(_free_port())], cwd=repo,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # rank 0 holds 2 rows of 0.0, rank 1 three rows of 1.0. Both ranks compute L = sum(i * g_i); the gradient that
    # reaches a rank's own rows is the sum over the two ranks' losses: 2 * i
    assert r0["gather"] == r1["gather"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert r0["gather_grad"] == [0.0, 2.0]
    assert r1["gather_grad"] == [4.0, 6.0, 8.0]
    # ProCo: every rank enqueued the keys of both ranks, in the same order
    torch.testing.assert_close(r0["queue"], r1["queue"])
    assert int((r0["queue"].norm(dim=1) > 0).sum()) == 10
    # LMD: the DDP gradient (local CE + relation terms on the gathered batch) equals the one-process gradient
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        mod = importlib.import_module("ddp")
        recipe, model = mod.make("lmd_rrl")
        loss, _ = recipe.loss(model, mod.data(), 0)
        loss.backward()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ddp", None)
    for g0, g1, p in zip(r0["lmd_rrl_grad"], r1["lmd_rrl_grad"], model.parameters()):
        torch.testing.assert_close(g0, g1)
        torch.testing.assert_close(g0, p.grad, rtol=1e-4, atol=1e-6)
