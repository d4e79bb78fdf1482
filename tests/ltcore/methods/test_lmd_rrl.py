from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltcore.methods.lmd_rrl import LMDRRLRecipe, active, ema_alpha, ema_update_


def test_lmd_rrl_terms_off_before_start_epoch(toy) -> None:
    recipe = toy.build("lmd_rrl", rrl_start_epoch=2)
    model = toy.model(recipe)
    recipe.setup(model)  # type: ignore[attr-defined]
    batch = toy.batch()
    for epoch in (0, 1, 2):  # [epoch > 2] is off
        loss, logs = recipe.loss(model, batch, epoch)
        assert logs["rrl_prob"] == logs["rrl_batch"] == logs["rrl_chan"] == 0.0
        # the loss is the student's CE on the strong view image2
        expected = F.cross_entropy(model(batch["image2"])["logits"], batch["label"])
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    _, logs = recipe.loss(model, batch, 3)
    assert logs["rrl_prob"] > 0 and logs["rrl_batch"] > 0 and logs["rrl_chan"] > 0


def test_lmd_rrl_channel_scale_from_config(toy) -> None:
    recipe = toy.build("lmd_rrl")
    assert isinstance(recipe, LMDRRLRecipe) and recipe.relation.chan_norm == "dim"  # the default
    recipe = toy.build("lmd_rrl", rrl_chan_norm="batch")
    assert isinstance(recipe, LMDRRLRecipe) and recipe.relation.chan_norm == "batch"


def test_lmd_rrl_teacher_equal_student_gives_zero_relation_terms(toy) -> None:
    recipe = toy.build("lmd_rrl", rrl_start_epoch=-1)
    model = toy.model(recipe)
    recipe.setup(model)  # type: ignore[attr-defined]
    batch = toy.batch()
    batch["image2"] = batch["image"]  # same input for teacher and student
    loss, logs = recipe.loss(model, batch, 0)
    assert logs["rrl_prob"] == pytest.approx(0.0, abs=1e-6)
    assert logs["rrl_batch"] == pytest.approx(0.0, abs=1e-6)
    assert logs["rrl_chan"] == pytest.approx(0.0, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(logs["ce"], abs=1e-5)


def test_lmd_rrl_teacher_is_frozen_checkpointed_and_ema(toy) -> None:
    recipe = toy.build("lmd_rrl", rrl_start_epoch=-1)
    assert isinstance(recipe, LMDRRLRecipe)
    model = toy.model(recipe)
    recipe.setup(model)
    extra = recipe.state_modules()
    assert not any(p.requires_grad for p in extra["teacher"].parameters())  # the optimiser skips it
    assert "counter.step" in extra.state_dict() and any(k.startswith("teacher.") for k in extra.state_dict())
    batch = toy.batch()
    opt = torch.optim.SGD(toy.params(model, recipe), lr=0.1)
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


# EMA teacher and the relation terms' switch


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (1, 0.5), (9, 0.9), (999, 0.999), (10**6, 0.999)])
def test_ema_alpha(step: int, expected: float) -> None:
    # min(1 - 1/(step+1), 0.999): 1 - 1/2 = 0.5, 1 - 1/10 = 0.9, 1 - 1/1000 = 0.999, then capped
    assert ema_alpha(step) == pytest.approx(expected)


def test_ema_alpha_rejects_negative_step() -> None:
    with pytest.raises(ValueError, match="step"):
        ema_alpha(-1)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


def test_ema_update_params_and_buffers() -> None:
    teacher, student = _net(), _net()
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
    teacher[1].running_mean.fill_(2.0)
    student[1].running_mean.fill_(6.0)
    student[1].num_batches_tracked.fill_(7)
    ema_update_(teacher, student, alpha=0.75)
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.5))  # 0.75 * 1 + 0.25 * 3
    torch.testing.assert_close(teacher[1].running_mean, torch.full((2,), 3.0))  # 0.75 * 2 + 0.25 * 6
    assert int(teacher[1].num_batches_tracked) == 7  # integer buffer copied
    for p in student.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 3.0))  # student untouched


def test_ema_update_alpha_zero_copies_student() -> None:
    teacher, student = _net(), _net()
    ema_update_(teacher, student, alpha=ema_alpha(0))
    for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(pt, ps)


def test_ema_update_rejects_different_architecture() -> None:
    with pytest.raises(ValueError, match="shape"):
        ema_update_(nn.Linear(2, 3), nn.Linear(2, 2), alpha=0.5)
    with pytest.raises(ValueError, match="names"):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), alpha=0.5)


def test_active_switch() -> None:
    assert not active(20)
    assert active(21)
    assert active(3, start_epoch=2) and not active(2, start_epoch=2)
