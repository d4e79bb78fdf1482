from __future__ import annotations

import math

import pytest
import torch

from ltcore.losses.jrcl import BDCLoss, OneToAllSupConLoss, binary_targets
from ltcore.losses.supcon import SupConLoss

# --- binary targets and BDC ------------------------------------------------------------------------------


def test_binary_targets() -> None:
    assert binary_targets(torch.tensor([0, 3, 1, 3, 2]), normal_index=3).tolist() == [1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="labels"):
        binary_targets(torch.tensor([0.0, 1.0]), normal_index=0)


def test_bdc_identity_zero_when_heads_agree() -> None:
    # Multi-class probabilities [0.3, 0.5, 0.2] with normal_index 1 -> b_m = [0.5, 0.5];
    # [0.1, 0.2, 0.7] with normal_index 1 -> b_m = [0.2, 0.8]. Binary logits log b_m reproduce them exactly.
    multi = torch.log(torch.tensor([[0.3, 0.5, 0.2], [0.1, 0.2, 0.7]]))
    binary = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]]))
    for symmetric in (False, True):
        out = BDCLoss(normal_index=1, symmetric=symmetric)(multi + 4.0, binary - 1.0)  # shifts change nothing
        assert abs(out.item()) < 1e-6


def test_bdc_kl_hand_value() -> None:
    # Multi logits [0, 0, 0], normal_index 1: b_m = [1/3, 2/3]; binary logits [0, 0]: b_a = [1/2, 1/2].
    # KL(b_a || b_m) = 0.5 log(0.5 / (1/3)) + 0.5 log(0.5 / (2/3)) = 0.5 log(1.5 * 0.75) = 0.5 log 1.125
    #               = 0.0588915
    loss = BDCLoss(normal_index=1)(torch.zeros(1, 3), torch.zeros(1, 2))
    assert loss.item() == pytest.approx(0.5 * math.log(1.125), abs=1e-6)
    assert loss.item() == pytest.approx(0.0588915, abs=1e-6)


def test_bdc_js_hand_value() -> None:
    # Same row; M = (b_a + b_m) / 2 = [5/12, 7/12].
    # KL(b_a || M) = 0.5 log(0.5 / (5/12)) + 0.5 log(0.5 / (7/12)) = 0.5 log 1.2 + 0.5 log(6/7)
    # KL(b_m || M) = (1/3) log((1/3) / (5/12)) + (2/3) log((2/3) / (7/12)) = (1/3) log 0.8 + (2/3) log(8/7)
    # JS = the mean of the two = 0.0143626
    kl_a = 0.5 * math.log(1.2) + 0.5 * math.log(6 / 7)
    kl_m = math.log(0.8) / 3 + 2 * math.log(8 / 7) / 3
    loss = BDCLoss(normal_index=1, symmetric=True)(torch.zeros(1, 3), torch.zeros(1, 2))
    assert loss.item() == pytest.approx(0.5 * (kl_a + kl_m), abs=1e-6)
    assert loss.item() == pytest.approx(0.0143626, abs=1e-6)


def test_bdc_batch_mean() -> None:
    # Row 1 is the hand row above (0.5 log 1.125); row 2 agrees (0): the batch mean is 0.25 log 1.125.
    multi = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    binary = torch.tensor([[0.0, 0.0], [0.0, math.log(2.0)]])
    loss = BDCLoss(normal_index=1)(multi, binary)
    assert loss.item() == pytest.approx(0.25 * math.log(1.125), abs=1e-6)


def test_bdc_matches_torch_kl_div_and_has_finite_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    multi = (torch.randn(6, 5, generator=g) * 30).requires_grad_(True)  # extreme logits: p underflows
    binary = (torch.randn(6, 2, generator=g) * 30).requires_grad_(True)
    loss = BDCLoss(normal_index=2)(multi, binary)
    p = torch.softmax(multi.double(), dim=1)
    b_m = torch.stack([p[:, 2], p.sum(1) - p[:, 2]], dim=1)
    ref = torch.nn.functional.kl_div(
        b_m.log(), torch.log_softmax(binary.double(), 1), log_target=True, reduction="batchmean"
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    loss.backward()
    assert torch.isfinite(multi.grad).all() and torch.isfinite(binary.grad).all()


def test_bdc_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="normal_index"):
        BDCLoss(normal_index=3)(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="logits_binary"):
        BDCLoss(normal_index=0)(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="normal_index"):
        BDCLoss(normal_index=-1)


# --- One-to-All SupCon -----------------------------------------------------------------------------------


def test_one_to_all_two_sample_closed_form() -> None:
    # C = 2, tau = 1. x0 = (1,0) class 0, x1 = (0,1) class 1; centres c0 = (0.6,0.8), c1 = (0.8,-0.6).
    # Anchor x0: targets x1 (class 1), c0 (class 0), c1 (class 1). Group sizes: class 0 without the anchor
    #   = {c0} -> 1; class 1 = {x1, c1} -> 2. den = e^0.6 / 1 + (e^0 + e^0.8) / 2; only positive c0:
    #   l0 = log den - 0.6
    # Anchor x1: cosines x0 0, c0 0.8, c1 -0.6. Class 0 = {x0, c0} -> 2, class 1 = {c1} -> 1.
    #   den = (e^0 + e^0.8) / 2 + e^-0.6; only positive c1: l1 = log den + 0.6
    loss = OneToAllSupConLoss(num_classes=2, dim=2, temperature=1.0, reduction="none")
    with torch.no_grad():
        loss.centres.copy_(torch.tensor([[0.6, 0.8], [0.8, -0.6]]))
    got = loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    l0 = math.log(math.exp(0.6) + (1 + math.exp(0.8)) / 2) - 0.6
    l1 = math.log((1 + math.exp(0.8)) / 2 + math.exp(-0.6)) + 0.6
    assert got.tolist() == pytest.approx([l0, l1], abs=1e-6)
    assert got.tolist() == pytest.approx([0.633985, 1.370840], abs=1e-5)


def test_one_to_all_hand_value_same_class_positives() -> None:
    # C = 2, tau = 1, samples a1 = a2 = (1,0) (class 0), b = (0,1) (class 1), c0 = (1,0), c1 = (0,1).
    # Anchor a1: class 0 targets {a2, c0}, both cosine 1, size 2 -> e^1; class 1 {b, c1}, cosine 0, size 2 -> 1.
    #   den = e + 1; positives a2 and c0, both log(e / (e + 1)) -> l = log(e + 1) - 1 = 0.313262 (a2 alike).
    # Anchor b: class 0 {a1, a2, c0} all cosine 0, size 3 -> 1; class 1 {c1} cosine 1 -> e; l = log(e + 1) - 1.
    loss = OneToAllSupConLoss(num_classes=2, dim=2, temperature=1.0)
    with torch.no_grad():
        loss.centres.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    got = loss(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1]))
    assert got.item() == pytest.approx(math.log(math.e + 1) - 1, abs=1e-6)


def test_one_to_all_identity_invariant_to_duplicating_another_class() -> None:
    # Class B's samples and centre all have the same direction, so each anchor of class A sees class B's
    # average exp-similarity unchanged however many B copies the batch holds: A's losses do not move.
    # Plain SupCon's denominator sums the copies instead, so its loss for the A anchors does change.
    a = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    b = torch.tensor([[-0.6, 0.8]])
    loss = OneToAllSupConLoss(num_classes=2, dim=2, temperature=0.5, reduction="none")
    with torch.no_grad():
        loss.centres.copy_(torch.tensor([[0.6, 0.8], [-0.6, 0.8]]))
    per_anchor = []
    supcon_a = []
    for copies in (1, 3, 5):
        x = torch.cat([a, b.repeat(copies, 1)])
        y = torch.tensor([0, 0] + [1] * copies)
        per_anchor.append(loss(x, y)[:2])
        # Plain SupCon's terms for the A anchors (each other's only positive), by the direct formula.
        z = x @ x.T / 0.5
        z.fill_diagonal_(float("-inf"))
        supcon_a.append(-(torch.log_softmax(z, dim=1)[[0, 1], [1, 0]]).mean())
    assert torch.allclose(per_anchor[0], per_anchor[1], atol=1e-6)
    assert torch.allclose(per_anchor[0], per_anchor[2], atol=1e-6)
    assert supcon_a[2] - supcon_a[0] > 1e-3


def test_one_to_all_multiview_equals_flattened() -> None:
    g = torch.Generator().manual_seed(0)
    loss = OneToAllSupConLoss(num_classes=4, dim=3, temperature=0.1, seed=1)
    feats = torch.randn(5, 2, 3, generator=g)
    y = torch.tensor([0, 1, 1, 3, 0])
    flat = torch.cat(torch.unbind(feats, dim=1))
    assert torch.allclose(loss(feats, y), loss(flat, y.repeat(2)), atol=1e-6)


def test_one_to_all_centres_learn_and_loss_falls() -> None:
    g = torch.Generator().manual_seed(2)
    loss = OneToAllSupConLoss(num_classes=3, dim=4, temperature=0.5)
    x = torch.randn(9, 4, generator=g, requires_grad=True)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2])
    opt = torch.optim.SGD([x, *loss.parameters()], lr=0.5)
    first = loss(x, y).item()
    for _ in range(20):
        opt.zero_grad()
        out = loss(x, y)
        out.backward()
        assert loss.centres.grad is not None and loss.centres.grad.abs().sum() > 0
        opt.step()
    assert loss(x, y).item() < first


def test_one_to_all_own_centre_is_a_positive() -> None:
    # Centres opposite to every feature (cosine ~ -1, tau 0.1): the own-centre positive has log-prob ~ -20,
    # so the loss is far above plain SupCon on the same batch. Guards against the centres being ignored.
    x = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.9, 0.2], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    one = OneToAllSupConLoss(num_classes=2, dim=2, temperature=0.1)
    with torch.no_grad():
        one.centres.copy_(torch.tensor([[-1.0, 0.0], [-1.0, 0.0]]))
    assert one(x, y).item() > SupConLoss(temperature=0.1)(x, y).item() + 1.0


def test_one_to_all_bad_input_raises() -> None:
    loss = OneToAllSupConLoss(num_classes=2, dim=2)
    with pytest.raises(ValueError, match="labels"):
        loss(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="dim"):
        loss(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        OneToAllSupConLoss(num_classes=2, dim=2, reduction="sum")
