from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltcore.losses.ce import CrossEntropyLoss

LN2 = math.log(2.0)
# rows are log-probabilities up to a constant: softmax(log [1, 2, 1]) = [1/4, 1/2, 1/4]
Z = torch.log(torch.tensor([[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]]))


@pytest.mark.parametrize(
    ("logits", "target", "kwargs", "expected"),
    [
        # uniform over 4 classes: -log(1/4) = log 4
        (torch.zeros(1, 4), torch.tensor([2]), {}, math.log(4.0)),
        # row 0, y=1: p=1/2 -> ln 2; row 1, y=1: p=1/4 -> ln 4 = 2 ln 2; mean = 1.5 ln 2
        (Z, torch.tensor([1, 1]), {}, 1.5 * LN2),
        # weight [1, 3, 1], y=[1, 0]: both rows have p_y = 1/2, so (3 * ln 2 + 1 * ln 2) / (3 + 1) = ln 2
        (Z, torch.tensor([1, 0]), {"weight": [1.0, 3.0, 1.0]}, LN2),
        # weight [1, 3, 1], y=[1, 2]: (3 * ln 2 + 1 * 2 ln 2) / (3 + 1) = 1.25 ln 2
        (Z, torch.tensor([1, 2]), {"weight": [1.0, 3.0, 1.0]}, 1.25 * LN2),
        # smoothing 0.3, row 0, y=1: 0.7 * ln 2 + 0.3 * mean(ln 4, ln 2, ln 4) = 0.7 ln 2 + 0.5 ln 2 = 1.2 ln 2
        (Z[:1], torch.tensor([1]), {"label_smoothing": 0.3}, 1.2 * LN2),
    ],
)
def test_values(logits: torch.Tensor, target: torch.Tensor, kwargs: dict, expected: float) -> None:
    loss = CrossEntropyLoss(**kwargs)(logits, target)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_identity_with_functional_ce_and_uniform_weight() -> None:
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    ref = F.cross_entropy(z, y)
    torch.testing.assert_close(CrossEntropyLoss()(z, y), ref)
    # uniform weights change nothing because the weighted mean divides by the weight sum
    torch.testing.assert_close(CrossEntropyLoss(weight=torch.full((5,), 2.5))(z, y), ref)


def test_gradient_finite() -> None:
    z = torch.tensor([[50.0, -50.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    CrossEntropyLoss(label_smoothing=0.1, weight=[1.0, 2.0, 3.0])(z, torch.tensor([1, 2])).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"weight": [1.0, -1.0]}, r"weight\[1\]"),
        ({"weight": [1.0, float("nan")]}, r"weight\[1\]"),
        ({"weight": [[1.0, 2.0]]}, "1-D"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CrossEntropyLoss(**kwargs)


def test_weight_length_mismatch() -> None:
    with pytest.raises(ValueError, match="3 classes"):
        CrossEntropyLoss(weight=[1.0, 2.0])(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="target"):
        CrossEntropyLoss()(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
