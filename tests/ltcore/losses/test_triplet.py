from __future__ import annotations

import math

import pytest
import torch

from ltcore.losses.triplet import BatchHardTripletLoss, ClassCentreTripletLoss


def test_batch_hard_hand_value_1d() -> None:
    # Points 0, 0.5, 0.8, 2.0 with labels [0, 0, 1, 1], margin 0.5, no normalisation (1-D):
    #   anchor 0.0: hardest pos |0-0.5| = 0.5, hardest neg min(0.8, 2.0) = 0.8 -> 0.5 - 0.8 + 0.5 = 0.2
    #   anchor 0.5: pos 0.5, neg min(0.3, 1.5) = 0.3                          -> 0.7
    #   anchor 0.8: pos |0.8-2| = 1.2, neg min(0.8, 0.3) = 0.3                -> 1.4
    #   anchor 2.0: pos 1.2, neg min(2.0, 1.5) = 1.5                          -> 0.2
    # mean = 2.5 / 4 = 0.625
    x = torch.tensor([[0.0], [0.5], [0.8], [2.0]])
    loss = BatchHardTripletLoss(margin=0.5, normalize=False)(x, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(0.625, abs=1e-6)


def test_batch_hard_hand_value_2d_normalised_and_no_positive_excluded() -> None:
    # (2,0), (0,3), (-1,0) normalise to (1,0), (0,1), (-1,0); labels [0, 0, 1]; margin 0.2.
    #   anchor 0: d_ap = |(1,-1)| = sqrt2, d_an = 2     -> relu(sqrt2 - 2 + 0.2) = 0
    #   anchor 1: d_ap = sqrt2, d_an = |(1,1)| = sqrt2  -> 0.2
    #   anchor 2: no positive, excluded
    # mean over anchors 0 and 1 = 0.1
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    loss = BatchHardTripletLoss(margin=0.2)(x, torch.tensor([0, 0, 1]))
    assert loss.item() == pytest.approx(0.1, abs=1e-6)
    assert math.sqrt(2) - 2 + 0.2 < 0  # the zero for anchor 0 above


def test_batch_hard_zero_when_classes_far_apart() -> None:
    # Classes at angles ~0 and ~180 degrees: d_ap <= 2 sin(0.05) ~ 0.1, d_an >= 2 cos(0.05) ~ 2, margin 0.2.
    ang = torch.tensor([0.0, 0.05, -0.05, math.pi, math.pi + 0.05, math.pi - 0.05])
    x = torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    assert BatchHardTripletLoss(margin=0.2)(x, torch.tensor([0, 0, 0, 1, 1, 1])).item() == 0.0


def test_batch_hard_margin_zero_hand_value() -> None:
    # margin 0 on points 0, 3, 1 with labels [0, 0, 1]:
    # anchor 0: 3 - 1 = 2; anchor 3: 3 - 2 = 1; anchor 1 (label 1) has no positive, excluded -> 1.5
    x = torch.tensor([[0.0], [3.0], [1.0]])
    y = torch.tensor([0, 0, 1])
    assert BatchHardTripletLoss(margin=0.0, normalize=False)(x, y).item() == pytest.approx(1.5, abs=1e-6)


def loop_batch_hard(x: torch.Tensor, y: torch.Tensor, margin: float) -> float:
    """Batch-hard written anchor by anchor with torch.dist, as an independent reference."""
    x = torch.nn.functional.normalize(x, dim=1)
    terms = []
    for i in range(len(x)):
        pos = [torch.dist(x[i], x[j]).item() for j in range(len(x)) if j != i and y[j] == y[i]]
        neg = [torch.dist(x[i], x[j]).item() for j in range(len(x)) if y[j] != y[i]]
        if pos and neg:
            terms.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_hard_identity_matches_loop_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])  # label 3 is a singleton: excluded
    got = BatchHardTripletLoss(margin=0.3)(x, y).item()
    assert got == pytest.approx(loop_batch_hard(x, y, 0.3), abs=1e-9)
    assert got > 0  # random points: the comparison is not 0 == 0


def test_batch_hard_single_class_gives_zero_with_gradient() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    loss = BatchHardTripletLoss()(x, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.all(x.grad == 0)


def test_batch_hard_gradient_is_finite_with_duplicate_points() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    loss = BatchHardTripletLoss(margin=0.2)(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_class_centre_hand_value_1d() -> None:
    # Points 0, 2, 2.5, 4, 10 with labels [0, 0, 1, 1, 2], margin 0.5, no normalisation.
    # Centres: c0 = 1, c1 = 3.25, c2 = 10.
    #   anchor 0:   d(c0) = 1,    nearest other c1 at 3.25 -> relu(1 - 3.25 + 0.5)  = 0
    #   anchor 2:   d(c0) = 1,    nearest other c1 at 1.25 -> relu(1 - 1.25 + 0.5)  = 0.25
    #   anchor 2.5: d(c1) = 0.75, nearest other c0 at 1.5  -> relu(0.75 - 1.5 + 0.5) = 0
    #   anchor 4:   d(c1) = 0.75, nearest other c0 at 3    -> 0
    #   anchor 10:  d(c2) = 0,    nearest other c1 at 6.75 -> 0
    # mean = 0.25 / 5 = 0.05
    x = torch.tensor([[0.0], [2.0], [2.5], [4.0], [10.0]])
    loss = ClassCentreTripletLoss(margin=0.5, normalize=False)(x, torch.tensor([0, 0, 1, 1, 2]))
    assert loss.item() == pytest.approx(0.05, abs=1e-6)


def test_class_centre_hand_value_2d_normalised() -> None:
    # (3,0), (0,2), (-1,0) normalise to (1,0), (0,1), (-1,0); labels [0, 0, 1]; margin 0.2.
    # c0 = (0.5, 0.5), c1 = (-1, 0).
    #   anchor (1,0):  d(c0) = sqrt(0.5) = 0.70711, d(c1) = 2         -> 0
    #   anchor (0,1):  d(c0) = 0.70711,             d(c1) = sqrt2     -> 0
    #   anchor (-1,0): d(c1) = 0,                   d(c0) = sqrt(2.5) -> 0
    # so raise the margin to 1.0: anchor (0,1) gives 0.70711 - 1.41421 + 1 = 0.29289, anchor (1,0) and
    # (-1,0) stay 0 (0.70711 - 2 + 1 < 0, 0 - 1.58114 + 1 < 0); mean = 0.29289 / 3 = 0.097631
    x = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    assert ClassCentreTripletLoss(margin=0.2)(x, y).item() == 0.0
    expected = (math.sqrt(0.5) - math.sqrt(2.0) + 1.0) / 3
    assert ClassCentreTripletLoss(margin=1.0)(x, y).item() == pytest.approx(expected, abs=1e-6)


def test_class_centre_zero_when_classes_far_apart() -> None:
    ang = torch.tensor([0.0, 0.05, -0.05, math.pi, math.pi + 0.05, math.pi - 0.05])
    x = torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    assert ClassCentreTripletLoss(margin=0.2)(x, torch.tensor([0, 0, 0, 1, 1, 1])).item() == 0.0


def test_class_centre_identity_singletons_equal_batch_hard() -> None:
    # With one sample per class every centre is the sample itself, so the anchor's own-centre distance is 0
    # and the nearest other centre is its hardest negative: l_i = relu(margin - d_an). Batch-hard has no
    # positive there, so compare with the closed form.
    x = torch.tensor([[0.0], [1.0], [3.0]])
    # anchor 0: relu(1.5 - 1) = 0.5; anchor 1: relu(1.5 - 1) = 0.5; anchor 3: relu(1.5 - 2) = 0 -> 1/3
    loss = ClassCentreTripletLoss(margin=1.5, normalize=False)(x, torch.tensor([0, 1, 2]))
    assert loss.item() == pytest.approx(1.0 / 3.0, abs=1e-6)


def test_class_centre_single_class_gives_zero() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    loss = ClassCentreTripletLoss()(x, torch.zeros(3, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None


def test_bad_margin_raises() -> None:
    with pytest.raises(ValueError, match="margin"):
        BatchHardTripletLoss(margin=-0.1)
    with pytest.raises(ValueError, match="margin"):
        ClassCentreTripletLoss(margin=-0.1)
