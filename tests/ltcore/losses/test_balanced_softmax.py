from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltcore.losses.balanced_softmax import BalancedSoftmaxLoss
from ltcore.losses.logit_adjust import LogitAdjustedLoss


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # counts [1, 3], z = [0, 0] -> z + log n = [0, ln 3]; y=0: -log(1 / (1 + 3)) = ln 4
        (torch.tensor([0]), math.log(4.0)),
        # y=1: -log(3 / 4) = ln(4/3) = 0.2876821
        (torch.tensor([1]), math.log(4.0 / 3.0)),
        # mean of both: (ln 4 + ln 4 - ln 3) / 2 = 0.8369882
        (torch.tensor([0, 1]), math.log(4.0) - math.log(3.0) / 2),
    ],
)
def test_values(target: torch.Tensor, expected: float) -> None:
    loss = BalancedSoftmaxLoss([1, 3])(torch.zeros(len(target), 2), target)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_uniform_counts_equal_cross_entropy() -> None:
    g = torch.Generator().manual_seed(5)
    z, y = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    torch.testing.assert_close(BalancedSoftmaxLoss([9, 9, 9, 9])(z, y), F.cross_entropy(z, y))


def test_equals_logit_adjusted_loss_with_tau_one() -> None:
    # log n and log pi differ by the constant log N, to which softmax is blind
    g = torch.Generator().manual_seed(6)
    z, y = torch.randn(6, 3, generator=g), torch.randint(0, 3, (6,), generator=g)
    counts = [500, 40, 3]
    torch.testing.assert_close(BalancedSoftmaxLoss(counts)(z, y), LogitAdjustedLoss(counts, tau=1.0)(z, y))


def test_gradient_finite() -> None:
    z = torch.tensor([[30.0, -30.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    BalancedSoftmaxLoss([10000, 10, 1])(z, torch.tensor([2, 1])).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


def test_bad_counts() -> None:
    with pytest.raises(ValueError, match=r"class_counts\[2\].*>= 1 training sample"):
        BalancedSoftmaxLoss([3, 1, 0])


def test_logit_width_mismatch() -> None:
    with pytest.raises(ValueError, match="2 classes"):
        BalancedSoftmaxLoss([3, 1, 1])(torch.zeros(1, 2), torch.tensor([0]))
