from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ltcore.config import ConfigError, from_dict, load_config, to_dict
from ltcore.losses import BatchHardTripletLoss, SupConLoss
from ltcore.methods.metric import MetricRecipe


def test_metric_supcon_value_is_ce_plus_supcon(toy) -> None:
    recipe = toy.build("metric", metric_loss="supcon", metric_lambda=0.5)
    model = toy.model(recipe)
    batch = toy.batch()
    loss, _ = recipe.loss(model, batch, 0)
    with torch.no_grad():
        out = model(torch.cat([batch["image"], batch["image2"]]))
        n = batch["label"].shape[0]
        ce = F.cross_entropy(out["logits"][:n], batch["label"])
        z = torch.stack([out["embedding"][:n], out["embedding"][n:]], dim=1)
        sc = SupConLoss(temperature=0.1)(z, batch["label"])
    assert float(loss.detach()) == pytest.approx(float(ce + 0.5 * sc), rel=1e-5)


@pytest.mark.parametrize(("metric", "lam"), [("triplet", 0.03), ("centre_triplet", 0.07), ("supcon", 1.0)])
def test_metric_lambda_default_per_loss_and_user_value_wins(metric: str, lam: float, toy) -> None:
    recipe = toy.build("metric", metric_loss=metric)  # metric_lambda left at its default, "auto"
    assert isinstance(recipe, MetricRecipe) and recipe.lam == lam
    for user in (0.5, 1.0, 0.0):  # any value the user sets wins, 1.0 included
        recipe = toy.build("metric", metric_loss=metric, metric_lambda=user)
        assert isinstance(recipe, MetricRecipe) and recipe.lam == user


def test_metric_triplet_default_value_is_ce_plus_0_03_triplet(toy) -> None:
    recipe = toy.build("metric", metric_loss="triplet")
    model = toy.model(recipe)
    batch = toy.batch()
    loss, _ = recipe.loss(model, batch, 0)
    with torch.no_grad():
        out = model(batch["image"])
        ce = F.cross_entropy(out["logits"], batch["label"])
        tri = BatchHardTripletLoss(margin=0.2)(out["embedding"], batch["label"])
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


