"""The toy setting of the stage-1 recipe tests: 3 classes, 8 x 8 images, an MLP backbone (the ``toy`` fixture)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from ltcore.config import LossConfig
from ltcore.methods.recipes import Stage1Recipe, build_stage1
from ltcore.models import LTModel


class Toy:
    """Builders of recipes, models and batches for the recipe tests."""

    classes = ("a", "b", "c")
    counts = (6, 3, 2)
    size = 8  # 8 x 8 images, SPMix patch 4

    @staticmethod
    def cfg(**kw: object) -> LossConfig:
        kw.setdefault("normal_class", "a")  # the classes have no 'nv', the config default
        return dataclasses.replace(LossConfig(), **kw)  # type: ignore[arg-type]

    def build(self, name: str, **kw: object) -> Stage1Recipe:
        return build_stage1(name, loss_cfg=self.cfg(**kw), class_counts=self.counts, classes=self.classes, epochs=10,
                            proj_dim=8)

    def model(self, recipe: Stage1Recipe, seed: int = 0) -> LTModel:
        torch.manual_seed(seed)
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * self.size * self.size, 32), nn.ReLU(), nn.Linear(32, 16))
        return LTModel(backbone, 16, 3, proj_dim=8 if recipe.needs_projector else 0,
                       aux_binary=recipe.needs_aux_binary)

    def batch(self, per_class: int = 4, seed: int = 0, tail: bool = False) -> dict[str, torch.Tensor]:
        """3 classes, each a different mean image plus noise; two views (two noise draws)."""
        g = torch.Generator().manual_seed(seed)
        s = self.size
        y = torch.arange(3).repeat_interleave(per_class)  # (3 * per_class,)
        means = torch.randn(3, 3, s, s, generator=g)

        def view(labels: torch.Tensor) -> torch.Tensor:
            return means[labels] + 0.3 * torch.randn(labels.shape[0], 3, s, s, generator=g)

        batch = {"image": view(y), "image2": view(y), "label": y}
        if tail:
            yt = y.flip(0)
            batch.update({"tail_image": view(yt), "tail_image2": view(yt), "tail_label": yt})
        return batch

    @staticmethod
    def params(model: nn.Module, recipe: Stage1Recipe) -> list[nn.Parameter]:
        both = nn.ModuleDict({"model": model, "extra": recipe.state_modules()})
        return [p for p in both.parameters() if p.requires_grad]

    def train(self, recipe: Stage1Recipe, model: nn.Module, batch: dict[str, torch.Tensor], steps: int,
              epoch: int = 0, lr: float = 0.05) -> tuple[float, float]:
        """Loss before and after ``steps`` SGD steps on one fixed batch (the engine's order of calls)."""
        recipe.start_epoch(epoch)
        opt = torch.optim.SGD(self.params(model, recipe), lr=lr, momentum=0.9)
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


@pytest.fixture
def toy() -> Toy:
    return Toy()
