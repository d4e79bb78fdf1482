from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltcore.losses.logit_adjust import LogitAdjustedLoss

# counts [1, 3] -> pi = [1/4, 3/4]


@pytest.mark.parametrize(
    ("tau", "target", "expected"),
    [
        # tau 1: z + log pi = [ln 1/4, ln 3/4]; y=0: -log((1/4) / 1) = ln 4
        (1.0, torch.tensor([0]), math.log(4.0)),
        # tau 2: z + 2 log pi = [ln 1/16, ln 9/16]; y=0: -log(1 / (1 + 9)) = ln 10
        (2.0, torch.tensor([0]), math.log(10.0)),
        # tau 2, y=1: -log(9 / 10) = 0.1053605
        (2.0, torch.tensor([1]), math.log(10.0 / 9.0)),
        # tau 0.5: z + 0.5 log pi = [ln 1/2, ln sqrt(3)/2]; y=0: -log(1 / (1 + sqrt 3)) = ln(1 + sqrt 3)
        (0.5, torch.tensor([0]), math.log(1.0 + math.sqrt(3.0))),
    ],
)
def test_values(tau: float, target: torch.Tensor, expected: float) -> None:
    loss = LogitAdjustedLoss([1, 3], tau=tau)(torch.zeros(len(target), 2), target)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_tau_zero_equals_cross_entropy() -> None:
    g = torch.Generator().manual_seed(7)
    z, y = torch.randn(6, 3, generator=g), torch.randint(0, 3, (6,), generator=g)
    torch.testing.assert_close(LogitAdjustedLoss([100, 10, 1], tau=0.0)(z, y), F.cross_entropy(z, y))


def test_gradient_finite() -> None:
    z = torch.tensor([[30.0, -30.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    LogitAdjustedLoss([10000, 10, 1])(z, torch.tensor([2, 1])).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tau"):
        LogitAdjustedLoss([1, 2], tau=float("nan"))
    with pytest.raises(ValueError, match=r"class_counts\[0\].*>= 1 training sample"):
        LogitAdjustedLoss([0, 2])
    with pytest.raises(ValueError, match="3 classes"):
        LogitAdjustedLoss([1, 2])(torch.zeros(1, 3), torch.tensor([0]))
