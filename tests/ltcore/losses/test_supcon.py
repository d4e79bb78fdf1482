from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltcore.losses.supcon import SupConLoss

# Four unit vectors at 0, 90, 180 and 270 degrees.
SQUARE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


def test_hand_value_four_points() -> None:
    # labels [0, 0, 1, 1], tau = 1. Anchor 0 = (1,0): positive (0,1) at cos 0, others (-1,0) at -1 and
    # (0,-1) at 0, so l_0 = -(0 - log(e^0 + e^-1 + e^0)) = log(2 + e^-1). Anchors 1-3 see the same cosines
    # (one positive at 0, one other at 0, one at -1), so the mean is log(2 + e^-1) = 0.861995...
    loss = SupConLoss(temperature=1.0)(SQUARE, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(math.log(2.0 + math.exp(-1.0)), abs=1e-6)
    assert loss.item() == pytest.approx(0.861995, abs=1e-6)


def test_hand_value_with_temperature_and_base_temperature() -> None:
    # Same points, tau = 0.5: cosines are doubled, l_i = log(2 + e^-2) = 0.758624...;
    # base_temperature 0.25 scales it by tau / tau_base = 2.
    y = torch.tensor([0, 0, 1, 1])
    assert SupConLoss(temperature=0.5)(SQUARE, y).item() == pytest.approx(math.log(2.0 + math.exp(-2.0)), abs=1e-6)
    scaled = SupConLoss(temperature=0.5, base_temperature=0.25)(SQUARE, y)
    assert scaled.item() == pytest.approx(2.0 * math.log(2.0 + math.exp(-2.0)), abs=1e-6)


def test_anchors_without_positive_are_excluded() -> None:
    # labels [0, 0, 1, 2]: anchors 2 and 3 have no positive. Anchors 0 and 1 each have l = log(2 + e^-1)
    # (anchor 1 = (0,1): positive (1,0) at 0, (-1,0) at 0, (0,-1) at -1). Counting the excluded anchors as
    # zeros would halve the mean.
    loss = SupConLoss(temperature=1.0)(SQUARE, torch.tensor([0, 0, 1, 2]))
    assert loss.item() == pytest.approx(math.log(2.0 + math.exp(-1.0)), abs=1e-6)


def test_no_positive_anywhere_gives_zero_with_gradient() -> None:
    x = SQUARE.clone().requires_grad_(True)
    loss = SupConLoss()(x, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.all(x.grad == 0)


def test_normalises_inside() -> None:
    y = torch.tensor([0, 0, 1, 1])
    scale = torch.tensor([[2.0], [0.5], [3.0], [7.0]])
    fn = SupConLoss(temperature=0.3)
    assert torch.allclose(fn(SQUARE * scale, y), fn(SQUARE, y), atol=1e-6)


def nt_xent(view1: torch.Tensor, view2: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent (SimCLR, arXiv 2002.05709) written directly with loops: 2N anchors, one positive each."""
    z = F.normalize(torch.cat([view1, view2]), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    total = torch.zeros((), dtype=z.dtype)
    for i in range(n2):
        j = (i + n) % n2
        num = torch.exp(z[i] @ z[j] / tau)
        den = sum(torch.exp(z[i] @ z[k] / tau) for k in range(n2) if k != i)
        total = total - torch.log(num / den)
    return total / n2


def test_identity_one_positive_per_anchor_equals_nt_xent() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(5, 2, 8, generator=g, dtype=torch.float64)  # (N, V, D), 5 distinct labels
    expected = nt_xent(feats[:, 0], feats[:, 1], tau=0.2)
    got = SupConLoss(temperature=0.2)(feats, torch.arange(5))
    assert got.item() == pytest.approx(expected.item(), abs=1e-10)


def test_multiview_equals_flattened() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(6, 3, 4, generator=g)
    y = torch.tensor([0, 1, 0, 2, 1, 3])
    flat = torch.cat(torch.unbind(feats, dim=1))  # (18, 4), view-major
    fn = SupConLoss(temperature=0.1)
    assert torch.allclose(fn(feats, y), fn(flat, y.repeat(3)), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_pytorch_metric_learning(seed: int) -> None:
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(24, 16, generator=g)  # pml normalises inside, as we do; unnormalised input is fine
    y = torch.randint(0, 6, (24,), generator=g)
    y[-1] = 99  # a singleton label: excluded from both means (pml: AvgNonZeroReducer)
    ours = SupConLoss(temperature=0.1)(feats, y)
    ref = pml_losses.SupConLoss(temperature=0.1)(feats, y)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)


def test_gradient_pulls_positives_together() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, generator=g, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    opt = torch.optim.SGD([x], lr=0.5)
    fn = SupConLoss(temperature=0.5)
    first = fn(x, y).item()
    for _ in range(20):
        opt.zero_grad()
        loss = fn(x, y)
        loss.backward()
        opt.step()
    assert fn(x, y).item() < first


@pytest.mark.parametrize(
    ("features", "labels", "match"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), "features"),
        (torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), "labels"),
        (torch.zeros(4, 2), torch.zeros(4), "labels"),
        (torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long), "features"),
    ],
)
def test_bad_input_raises(features: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SupConLoss()(features, labels)


def test_bad_temperature_raises() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=0.0)
    with pytest.raises(ValueError, match="base_temperature"):
        SupConLoss(base_temperature=-1.0)
