from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp

from ltcore.losses.lmd import FDCLoss, GeneralizedCELoss, RelationDistillationLoss

# ---------------------------------------------------------------- relation distillation


# B = 3 samples, D = 2 channels: B != D, so a mix-up of A A^T (B x B) and A^T A (D x D) changes the numbers.
A_S = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
A_T = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
# S = A A^T = [[1,0,1],[0,1,1],[1,1,2]] -> rows [1,0,1]/sqrt2, [0,1,1]/sqrt2, [1,1,2]/sqrt6;
# S' = [[1,1,0],[1,1,0],[0,0,1]] -> rows [1,1,0]/sqrt2 (twice), [0,0,1]. Squared row differences:
# [0,-1,1]/sqrt2 -> 1; [-1,0,1]/sqrt2 -> 1; [1/sqrt6, 1/sqrt6, 2/sqrt6 - 1] -> 2 - 4/sqrt6. Sum 4 - 4/sqrt6 = 2.367007.
BATCH_SQ = 4 - 4 / math.sqrt(6)
# G = A^T A = [[2,1],[1,2]] -> rows [2,1]/sqrt5, [1,2]/sqrt5; G' = [[2,0],[0,1]] -> rows [1,0], [0,1].
# Each row differs by (2/sqrt5 - 1)^2 + 1/5 = 2 - 4/sqrt5; sum 4 - 8/sqrt5 = 0.422291.
CHAN_SQ = 4 - 8 / math.sqrt(5)


def test_relation_hand_values_batch_and_channel_terms() -> None:
    z_s = torch.zeros(3, 2)
    z_t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]])
    out = RelationDistillationLoss()(z_s, z_t, A_S, A_T)
    # Row 0: p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812; rows 1, 2: 0. Mean over 3.
    prob = (0.75 * math.log(1.5) - 0.25 * math.log(2.0)) / 3  # 0.043604
    batch = BATCH_SQ / 3  # / B = 0.789002
    chan = CHAN_SQ / (2 / 4)  # / (D / 4) = 0.844582 (the default chan_norm="dim")
    assert out["prob"].item() == pytest.approx(prob, rel=1e-5)
    assert out["batch"].item() == pytest.approx(batch, rel=1e-5)
    assert out["chan"].item() == pytest.approx(chan, rel=1e-5)
    assert out["total"].item() == pytest.approx(5 * prob + 10 * batch + 10 * chan, rel=1e-5)


def test_relation_channel_term_public_form_divides_by_batch() -> None:
    out = RelationDistillationLoss(chan_norm="batch")(torch.zeros(3, 2), torch.zeros(3, 2), A_S, A_T)
    assert out["chan"].item() == pytest.approx(CHAN_SQ / 3, rel=1e-5)  # 0.140764
    assert out["batch"].item() == pytest.approx(BATCH_SQ / 3, rel=1e-5)  # unchanged


def test_relation_channel_scale_equals_public_form_at_public_setting() -> None:
    # ResNet-18 features (D = 512) at B = 128: D / 4 = B, so both normalisations give the same term.
    g = torch.Generator().manual_seed(0)
    a_s, a_t = torch.randn(128, 512, generator=g), torch.randn(128, 512, generator=g)
    z = torch.zeros(128, 3)
    dim = RelationDistillationLoss(chan_norm="dim")(z, z, a_s, a_t)["chan"]
    batch = RelationDistillationLoss(chan_norm="batch")(z, z, a_s, a_t)["chan"]
    torch.testing.assert_close(dim, batch)
    # EfficientNet-Lite0 (D = 1280) at B = 64: the public form is D / (4 B) = 5x the default
    a_s, a_t = torch.randn(64, 1280, generator=g), torch.randn(64, 1280, generator=g)
    z = torch.zeros(64, 3)
    dim = RelationDistillationLoss(chan_norm="dim")(z, z, a_s, a_t)["chan"]
    batch = RelationDistillationLoss(chan_norm="batch")(z, z, a_s, a_t)["chan"]
    torch.testing.assert_close(batch, 5 * dim)


def test_relation_weights() -> None:
    out = RelationDistillationLoss(w_prob=1.0, w_batch=0.0, w_chan=2.0)(torch.zeros(3, 2), torch.ones(3, 2), A_S, A_T)
    assert out["total"].item() == pytest.approx(out["prob"].item() + 2 * out["chan"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="chan_norm"):
        RelationDistillationLoss(chan_norm="sample")


def test_relation_identity_teacher_equals_student() -> None:
    g = torch.Generator().manual_seed(0)
    z, a = torch.randn(5, 4, generator=g), torch.randn(5, 8, generator=g)
    out = RelationDistillationLoss()(z, z.clone(), a, a.clone())
    for key in ("prob", "batch", "chan", "total"):
        assert out[key].item() == pytest.approx(0.0, abs=1e-7), key


def test_relation_teacher_detached_and_student_gets_grad() -> None:
    g = torch.Generator().manual_seed(1)
    z_s = torch.randn(4, 3, generator=g, requires_grad=True)
    z_t = torch.randn(4, 3, generator=g, requires_grad=True)
    a_s = torch.randn(4, 6, generator=g, requires_grad=True)
    a_t = torch.randn(4, 6, generator=g, requires_grad=True)
    RelationDistillationLoss()(z_s, z_t, a_s, a_t)["total"].backward()
    assert z_t.grad is None and a_t.grad is None
    assert z_s.grad is not None and a_s.grad is not None and a_s.grad.abs().sum() > 0


def test_relation_zero_feature_row_is_finite() -> None:
    a_s = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    out = RelationDistillationLoss()(torch.zeros(2, 2), torch.zeros(2, 2), a_s, torch.ones(2, 2))
    assert all(torch.isfinite(v) for v in out.values())


def test_relation_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="feats"):
        RelationDistillationLoss()(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logits"):
        RelationDistillationLoss()(torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))


# ---------------------------------------------------------------- generalised CE


def test_gce_hand_value() -> None:
    loss = GeneralizedCELoss(q=0.7)(torch.zeros(1, 2), torch.tensor([0]))
    # p_y = 1/2: (1 - 0.5^0.7) / 0.7 = (1 - 0.615572) / 0.7 = 0.549183
    assert loss.item() == pytest.approx((1 - 0.5**0.7) / 0.7, rel=1e-6)
    assert loss.item() == pytest.approx(0.549183, abs=1e-6)


def test_gce_q_one_is_one_minus_p() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    # q = 1: mean(1 - p_y) with p = 3/4 (target 0) and 1/2 (target 1): (1/4 + 1/2) / 2 = 0.375
    assert GeneralizedCELoss(q=1.0)(logits, torch.tensor([0, 1])).item() == pytest.approx(0.375, rel=1e-6)


def test_gce_small_q_approaches_ce() -> None:
    g = torch.Generator().manual_seed(2)
    logits, target = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    ce = F.cross_entropy(logits, target).item()
    # (1 - p^q)/q = -log p - q (log p)^2 / 2 + ...: relative gap ~ q * |log p| / 2, well under 1e-3 here.
    assert GeneralizedCELoss(q=1e-4)(logits, target).item() == pytest.approx(ce, rel=1e-3)


def test_gce_has_gradient_and_rejects_bad_q() -> None:
    logits = torch.zeros(2, 3, requires_grad=True)
    GeneralizedCELoss()(logits, torch.tensor([0, 2])).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    for q in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="q"):
            GeneralizedCELoss(q=q)


# ---------------------------------------------------------------- FDC


def test_fdc_hand_value_identity_covariances() -> None:
    means = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    covs = torch.stack([torch.eye(2), torch.eye(2)])
    feats = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    loss = FDCLoss()(feats, torch.tensor([0, 1]), means, covs)
    # f0 (class 0): M = (0, 4) -> 0/2 + log(e^0 + e^-2) = log(1 + e^-2) = 0.126928
    # f1 (class 1): M = (1, 1) -> 1/2 + log(2 e^-0.5) = log 2 = 0.693147; mean 0.410038
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert expected == pytest.approx(0.410038, abs=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_fdc_uses_covariance() -> None:
    means = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    covs = torch.stack([torch.diag(torch.tensor([4.0, 1.0])), torch.eye(2)])
    loss = FDCLoss()(torch.tensor([[2.0, 0.0]]), torch.tensor([1]), means, covs)
    # M_own = 0; M_other = 2^2 / 4 = 1 under diag(4, 1): 0 + log(e^0 + e^-0.5) = log(1.606531) = 0.474077
    # (with an identity covariance M_other would be 4: log(1 + e^-2) = 0.126928)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-6)


def test_fdc_gradient_pulls_toward_own_class() -> None:
    # The corrected sign: a descent step moves the feature toward its class mean (the public code's moved it away).
    means = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    covs = torch.stack([torch.eye(2), torch.eye(2)])
    f = torch.tensor([[0.5, 0.0]], requires_grad=True)
    FDCLoss()(f, torch.tensor([0]), means, covs).backward()
    assert f.grad is not None
    stepped = f.detach() - 0.1 * f.grad
    assert stepped.norm() < f.detach().norm()


def test_fdc_identity_many_far_classes() -> None:
    # A feature exactly at its own mean and infinitely far from the others: loss = 0 + log(1 + 0 + 0) = 0, its infimum.
    means = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    covs = torch.eye(2).repeat(3, 1, 1)
    loss = FDCLoss()(torch.tensor([[0.0, 0.0]]), torch.tensor([0]), means, covs)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def _fdc_reference(f: np.ndarray, y: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> tuple[float, np.ndarray]:
    """Float64 NumPy/SciPy reference: loss and its analytic gradient w.r.t. ``f (B, D)``.

    ``L_i = M_iy/2 + logsumexp_c(-M_ic/2)``, ``M_ic = d_ic^T P_c d_ic``, ``d_ic = f_i - mu_c``, ``P_c = Sigma_c^-1``;
    ``dL_i/df_i = P_y d_iy - sum_c w_ic P_c d_ic`` with ``w_i = softmax(-M_i/2)``; L and its gradient are means over i.
    """
    b = f.shape[0]
    prec = np.linalg.inv(cov)  # (C, D, D)
    d = f[:, None, :] - mu[None, :, :]  # (B, C, D)
    pd = np.einsum("cjk,bck->bcj", prec, d)  # P_c d_ic, (B, C, D)
    m = np.einsum("bcj,bcj->bc", d, pd)  # (B, C)
    lse = logsumexp(-m / 2, axis=1)  # (B,)
    loss = float(np.mean(m[np.arange(b), y] / 2 + lse))
    w = np.exp(-m / 2 - lse[:, None])  # (B, C)
    grad = pd[np.arange(b), y] - np.einsum("bc,bcj->bj", w, pd)
    return loss, grad / b


@pytest.mark.parametrize("dim", [256, 1280])
def test_fdc_realistic_dimension_matches_float64_reference(dim: int) -> None:
    # Features drawn from their class Gaussians: M_own ~ D and M_other > D, so exp(-M/2) <= e^-128, below float32's
    # smallest number: the old form mean exp(-M_other/2) - mean exp(-M_own/2) was exactly 0, loss and gradient.
    rng = np.random.default_rng(0)
    c, b = 3, 8
    mu = rng.normal(0.0, 0.02, size=(c, dim))  # (C, D)
    shared = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = shared + 0.1 * rng.normal(size=(c, dim, dim)) / np.sqrt(dim)  # similar, not equal, class shapes
    cov = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(dim)  # (C, D, D), positive definite
    y = np.arange(b) % c
    chol = np.linalg.cholesky(cov)
    f = mu[y] + np.einsum("bjk,bk->bj", chol[y], rng.normal(size=(b, dim)))  # (B, D), x ~ N(mu_y, Sigma_y)
    ref_loss, ref_grad = _fdc_reference(f, y, mu, cov)
    assert ref_loss > 0.05  # the classes overlap: a loss well away from its infimum 0

    feats = torch.tensor(f, dtype=torch.float32, requires_grad=True)
    loss = FDCLoss()(feats, torch.tensor(y), torch.tensor(mu, dtype=torch.float32),
                     torch.tensor(cov, dtype=torch.float32))
    loss.backward()
    assert feats.grad is not None and float(feats.grad.abs().sum()) > 0
    # float32 Cholesky against float64 inverses: agreement to ~1e-5 here
    assert loss.item() == pytest.approx(ref_loss, rel=1e-4)
    np.testing.assert_allclose(feats.grad.numpy(), ref_grad, rtol=1e-3, atol=1e-4 * np.abs(ref_grad).max())


def test_fdc_bad_input() -> None:
    means, covs = torch.zeros(2, 2), torch.eye(2).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="labels"):
        FDCLoss()(torch.zeros(1, 2), torch.tensor([2]), means, covs)
    with pytest.raises(ValueError, match="covs"):
        FDCLoss()(torch.zeros(1, 2), torch.tensor([0]), means, torch.eye(3).repeat(2, 1, 1))
    with pytest.raises(ValueError, match="2 classes"):
        FDCLoss()(torch.zeros(1, 2), torch.tensor([0]), means[:1], covs[:1])
