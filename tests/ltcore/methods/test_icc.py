from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ltcore.methods.icc import ClassGaussians, e_step_loss, fit_class_gaussians, m_step


def _blobs(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes in 4-D, unit-variance Gaussians centred at 5 * e_c (pairwise distance ~7 sigma)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(per_class)
    x = 5.0 * torch.eye(4)[y] + torch.randn(y.shape[0], 4, generator=g)
    return x, y


def test_fit_class_gaussians_hand_values() -> None:
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    g = fit_class_gaussians(x, y, 2, shrinkage=0.01)
    # class 0: mean (1, 0); deviations (-1, 0), (1, 0) -> sum of outer products [[2, 0], [0, 0]] / (2 - 1) + 0.01 I
    # class 1: one sample -> mean (1, 1), covariance 0.01 I only
    torch.testing.assert_close(g.means, torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(g.covs[0], torch.tensor([[2.01, 0.0], [0.0, 0.01]], dtype=torch.float64))
    torch.testing.assert_close(g.covs[1], 0.01 * torch.eye(2, dtype=torch.float64))


def test_fit_class_gaussians_needs_every_class() -> None:
    with pytest.raises(ValueError, match=r"classes \[2\] have no sample"):
        fit_class_gaussians(torch.zeros(2, 2), torch.tensor([0, 1]), 3)


def test_m_step_separates_well_separated_gaussians() -> None:
    x, y = _blobs(50, seed=0)
    gaussians = fit_class_gaussians(x, y, 3)
    head = m_step(gaussians, per_class=200, feat_dim=4, num_classes=3, lr=0.1, batch_size=32,
                  generator=torch.Generator().manual_seed(0))
    assert isinstance(head, nn.Linear) and head.weight.shape == (3, 4) and not head.training
    xt, yt = _blobs(200, seed=1)  # fresh real samples
    with torch.no_grad():
        acc = (head(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.95


def test_m_step_reproducible_and_fresh() -> None:
    gaussians = fit_class_gaussians(*_blobs(20, seed=0), 3)

    def run(seed: int, init: nn.Linear | None = None) -> nn.Linear:
        return m_step(gaussians, 10, 4, 3, lr=0.1, generator=torch.Generator().manual_seed(seed), init=init)

    a, b, c = run(0), run(0), run(1)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    assert not torch.equal(a.weight, c.weight)
    # warm start: init is copied, not modified, and training starts from it
    init = nn.Linear(4, 3)
    w0 = init.weight.detach().clone()
    warm = m_step(gaussians, 10, 4, 3, lr=1e-12, generator=torch.Generator().manual_seed(0), init=init)
    torch.testing.assert_close(init.weight.detach(), w0, rtol=0, atol=0)
    torch.testing.assert_close(warm.weight.detach(), w0)


def test_m_step_checks_sizes() -> None:
    gaussians = fit_class_gaussians(*_blobs(5, seed=0), 3)
    with pytest.raises(ValueError, match="num_classes=4, feat_dim=4"):
        m_step(gaussians, 10, 4, 4, lr=0.1, generator=torch.Generator())
    with pytest.raises(ValueError, match="per_class must be >= 1"):
        m_step(gaussians, 0, 4, 3, lr=0.1, generator=torch.Generator())


# Literal 2-D case: class means (0, 0) and (2, 0), identity covariances; feature 0 = (0, 0) of class 0, feature 1 =
# (2, 0) of class 1. Own squared Mahalanobis distance 0, the other class at distance^2 4, for both features:
# L_FDC = mean_i [M_iy/2 + logsumexp_c(-M_ic/2)] = 0 + log(e^0 + e^-2) = log(1 + e^-2) = 0.1269280110.
# Logits [0, 0] and [0, ln 3] give p_y = 1/2 and 3/4; GCE (q = 0.7) = mean (1 - p_y^0.7) / 0.7
# = ((1 - 0.5^0.7) + (1 - 0.75^0.7)) / 1.4 = ((1 - 0.6155722) + (1 - 0.8176038)) / 1.4 = 0.4048743.
FEATS = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
LOGITS = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
LABELS = torch.tensor([0, 1])
MEANS = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
COVS = torch.eye(2).repeat(2, 1, 1)
GCE = ((1 - 0.5**0.7) + (1 - 0.75**0.7)) / 1.4
FDC = math.log(1.0 + math.exp(-2.0))


def test_e_step_loss_hand_value() -> None:
    assert abs(GCE - 0.4048743) < 1e-6
    assert abs(FDC - 0.1269280110) < 1e-9
    loss, logs = e_step_loss(FEATS, LOGITS, LABELS, MEANS, COVS, gce_q=0.7, fdc_weight=0.5)
    assert logs["gce"] == pytest.approx(GCE, rel=1e-5)
    assert logs["fdc"] == pytest.approx(FDC, rel=1e-5)
    assert float(loss) == pytest.approx(GCE + 0.5 * FDC, rel=1e-4)  # 0.4048743 + 0.0634640 = 0.4683383
    # LMD's default weight 1e-4
    loss, _ = e_step_loss(FEATS, LOGITS, LABELS, MEANS, COVS)
    assert float(loss) == pytest.approx(GCE + 1e-4 * FDC, rel=1e-5)


def test_e_step_loss_zero_fdc_weight_is_gce_and_gradients_flow() -> None:
    feats = FEATS.clone().requires_grad_(True)
    logits = LOGITS.clone().requires_grad_(True)
    loss, logs = e_step_loss(feats, logits, LABELS, MEANS, COVS, fdc_weight=0.0)
    assert float(loss.detach()) == pytest.approx(GCE, rel=1e-5) and logs["fdc"] == 0.0
    # GCE carries gradients (the public code's no-grad GCE would not)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # FDC sends gradients to the features, pulling them toward their own class: moving feature 0 from (0.5, 0)
    # toward its own mean (0, 0) lowers the loss, so the gradient's x-component is positive
    feats = torch.tensor([[0.5, 0.0], [2.0, 0.0]], requires_grad=True)
    loss, _ = e_step_loss(feats, LOGITS, LABELS, MEANS, COVS, fdc_weight=1.0)
    loss.backward()
    assert feats.grad is not None and feats.grad[0, 0] > 0


def test_class_gaussians_fit_hand_values() -> None:
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])
    stats = ClassGaussians.fit(feats, torch.tensor([0, 0, 1]), num_classes=2, shrinkage=0.01)
    # class 0: mean (1, 0); centred (-1, 0), (1, 0): unbiased cov [[2, 0], [0, 0]] / (2 - 1), + 0.01 I
    # class 1: one sample, mean (1, 3), covariance 0.01 I only
    torch.testing.assert_close(stats.means, torch.tensor([[1.0, 0.0], [1.0, 3.0]]))
    torch.testing.assert_close(stats.covs[0], torch.tensor([[2.01, 0.0], [0.0, 0.01]]))
    torch.testing.assert_close(stats.covs[1], 0.01 * torch.eye(2))
    assert stats.counts.tolist() == [2, 1]


def test_class_gaussians_missing_class() -> None:
    feats, labels = torch.zeros(2, 2), torch.tensor([0, 0])
    with pytest.raises(ValueError, match=r"classes \[1, 2\]"):
        ClassGaussians.fit(feats, labels, num_classes=3)
    stats = ClassGaussians.fit(feats, labels, num_classes=3, allow_missing=True)
    assert stats.counts.tolist() == [2, 0, 0]
    torch.testing.assert_close(stats.covs[2], 0.01 * torch.eye(2))


def test_class_gaussians_bad_input() -> None:
    with pytest.raises(ValueError, match="labels"):
        ClassGaussians.fit(torch.zeros(2, 2), torch.tensor([0, 5]), num_classes=2)
    with pytest.raises(ValueError, match="shrinkage"):
        ClassGaussians.fit(torch.zeros(2, 2), torch.tensor([0, 1]), num_classes=2, shrinkage=0.0)


def test_class_gaussians_sample_moments_and_determinism() -> None:
    means = torch.tensor([[0.0, 0.0], [5.0, -1.0]])
    covs = torch.stack([torch.tensor([[2.0, 0.6], [0.6, 1.0]]), 0.25 * torch.eye(2)])
    stats = ClassGaussians(means, covs)
    x, y = stats.sample(20000, torch.Generator().manual_seed(3))
    assert x.shape == (40000, 2) and y.tolist()[:1] == [0] and y.tolist()[-1:] == [1]
    assert torch.equal(torch.bincount(y), torch.tensor([20000, 20000]))
    refit = ClassGaussians.fit(x, y, num_classes=2, shrinkage=1e-12)
    # standard error of a mean is ~ sqrt(2 / 20000) = 0.01; 0.05 is five of them
    torch.testing.assert_close(refit.means, means, atol=0.05, rtol=0)
    torch.testing.assert_close(refit.covs, covs, atol=0.08, rtol=0)
    x2, _ = stats.sample(20000, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2)
    x3, y3 = stats.sample(4, torch.Generator().manual_seed(3), classes=[1])
    assert x3.shape == (4, 2) and y3.tolist() == [1, 1, 1, 1]


def test_class_gaussians_ema_update() -> None:
    stats = ClassGaussians(torch.zeros(2, 2), torch.stack([torch.eye(2), torch.eye(2)]))
    new_means = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    new_covs = torch.stack([3 * torch.eye(2), 3 * torch.eye(2)])
    stats.ema_update_(new_means, new_covs, decay=0.9, mask=torch.tensor([True, False]))
    # class 0: 0.9 * 0 + 0.1 * 10 = 1; cov 0.9 * 1 + 0.1 * 3 = 1.2 on the diagonal; class 1 masked out
    torch.testing.assert_close(stats.means, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(stats.covs[0], 1.2 * torch.eye(2))
    torch.testing.assert_close(stats.covs[1], torch.eye(2))
    stats.ema_update_(new_means, new_covs, decay=0.0)  # decay 0 replaces everything
    torch.testing.assert_close(stats.means, new_means)
