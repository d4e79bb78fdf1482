from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltcore.losses.focal import FocalLoss

LN2 = math.log(2.0)
# softmax(log [1, 2, 1]) = [1/4, 1/2, 1/4]; softmax(log [2, 1, 1]) = [1/2, 1/4, 1/4]
Z = torch.log(torch.tensor([[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]]))


@pytest.mark.parametrize(
    ("logits", "target", "kwargs", "expected"),
    [
        # p_y = 1/2: (1 - 1/2)^2 * ln 2 = 0.25 ln 2
        (Z[:1], torch.tensor([1]), {"gamma": 2.0}, 0.25 * LN2),
        # row 0 as above 0.25 ln 2; row 1, y=1: p=1/4, (3/4)^2 * ln 4 = 9/16 * 2 ln 2 = 1.125 ln 2; mean 0.6875 ln 2
        (Z, torch.tensor([1, 1]), {"gamma": 2.0}, 0.6875 * LN2),
        # gamma 1, weight [1, 3, 1], y=[1, 2]: row 0 (w=3) (1/2) ln 2, row 1 (w=1) (3/4) * 2 ln 2 = 1.5 ln 2
        #   weighted mean (3 * 0.5 + 1 * 1.5) / 4 = 0.75 ln 2
        (Z, torch.tensor([1, 2]), {"gamma": 1.0, "weight": [1.0, 3.0, 1.0]}, 0.75 * LN2),
    ],
)
def test_values(logits: torch.Tensor, target: torch.Tensor, kwargs: dict, expected: float) -> None:
    loss = FocalLoss(**kwargs)(logits, target)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weight", [None, [0.5, 1.0, 2.0, 4.0]])
def test_gamma_zero_equals_cross_entropy(weight: list[float] | None) -> None:
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(8, 4, generator=g), torch.randint(0, 4, (8,), generator=g)
    w = None if weight is None else torch.tensor(weight)
    torch.testing.assert_close(FocalLoss(gamma=0.0, weight=weight)(z, y), F.cross_entropy(z, y, weight=w))


def test_focal_below_cross_entropy_per_sample() -> None:
    # (1 - p)^gamma <= 1, so every sample's focal term is at most its CE term
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(5, 3, generator=g), torch.randint(0, 3, (5,), generator=g)
    for i in range(5):
        focal = FocalLoss(gamma=2.0)(z[i : i + 1], y[i : i + 1])
        assert focal < F.cross_entropy(z[i : i + 1], y[i : i + 1])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_gradient_finite_even_when_p_rounds_to_one(gamma: float) -> None:
    # row 0: p_y rounds to 1 in float32, where d/dp (1-p)^0.5 would be infinite without the clamp
    z = torch.tensor([[100.0, 0.0, 0.0], [0.0, 1.0, -1.0]], requires_grad=True)
    loss = FocalLoss(gamma=gamma, weight=[1.0, 2.0, 3.0])(z, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_negative_gamma_rejected() -> None:
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)
