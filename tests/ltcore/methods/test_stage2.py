"""Stage-2 fine-tuning of the stage-1 classifier on cached features: cRW (re-weighted CE) and DRS (re-sampling).

CPU only, on tiny synthetic features; each test runs in well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from ltcore.config import load_config
from ltcore.losses import CrossEntropyLoss
from ltcore.methods import stage2
from ltcore.methods.stage2 import calibrate


class _RecordingCE(CrossEntropyLoss):
    """The loss ``_train_head`` builds, remembering its class weights and every batch's targets."""

    built: ClassVar[list[_RecordingCE]] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.targets: list[torch.Tensor] = []
        _RecordingCE.built.append(self)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.targets.append(target.detach().clone())
        return super().forward(logits, target)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[_RecordingCE]]:
    _RecordingCE.built = []
    monkeypatch.setattr(stage2, "CrossEntropyLoss", _RecordingCE)
    yield _RecordingCE.built


def _eye_head() -> nn.Linear:
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    return head


def _toy(n0: int, n1: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian classes at x = -1 and x = +1 (sd 0.7): the Bayes balanced accuracy is Phi(1/0.7) = 0.92."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n0, 2, generator=g) * 0.7 + torch.tensor([-1.0, 0.0])
    x1 = torch.randn(n1, 2, generator=g) * 0.7 + torch.tensor([1.0, 0.0])
    return torch.cat([x0, x1]), torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])


def _head_biased_to_class0() -> nn.Linear:
    """A stage-1 head as a long tail leaves it: the right direction, a bias of 3 towards the head class."""
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        head.bias.copy_(torch.tensor([1.5, -1.5]))
    return head


def _balanced_accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(balanced_accuracy_score(y.numpy(), head(x).argmax(1).numpy()))


# ---------------------------------------------------------------------------------------------------------------
# cRW


def test_crw_weights_are_class_balanced(recorded: list[_RecordingCE]) -> None:
    x, y = torch.randn(10, 2), torch.tensor([0] * 8 + [1] * 2)
    calibrate("crw", _eye_head(), x, y, x, y, [8, 2], epochs=1, batch_size=4)
    (loss,) = recorded
    # w_j = (1 - b) / (1 - b^n_j), b = 0.9999, n = [8, 2], rescaled to sum to C = 2: close to inverse frequency
    b = 0.9999
    raw = [(1 - b) / (1 - b**n) for n in (8, 2)]
    expected = [2 * w / sum(raw) for w in raw]
    assert expected == pytest.approx([0.4000960, 1.5999040], abs=1e-6)
    assert loss.weight is not None
    torch.testing.assert_close(loss.weight, torch.tensor(expected), rtol=0, atol=1e-6)


def test_crw_loss_is_weighted_ce_from_the_stage1_head() -> None:
    # logits = x (identity head): l = log(1 + e^-2), log(1 + e^-1), log 2 for the three samples
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    head = _eye_head()
    res = calibrate("crw", head, x, y, x, y, [1, 2], epochs=1, lr=0.0, batch_size=3)
    # counts [1, 2]: w0 / w1 = (1 - b^2) / (1 - b) = 1 + b = 1.9999; the weighted mean is
    # (1.9999 * 0.1269280 + 0.3132617 + 0.6931472) / (1.9999 + 2) = 0.3150709 (unweighted it would be 0.3777790)
    losses = res.info["loss"]
    assert isinstance(losses, list) and len(losses) == 1
    assert losses[0] == pytest.approx(0.3150709, abs=1e-6)
    # lr = 0: the result is the stage-1 classifier itself (fine-tuned, not re-initialised), as a new module
    assert res.head is not head
    torch.testing.assert_close(res.head.weight, head.weight, rtol=0, atol=0)
    torch.testing.assert_close(res.head.bias, head.bias, rtol=0, atol=0)


def test_crw_samples_every_instance_once_per_epoch(recorded: list[_RecordingCE]) -> None:
    x, y = torch.randn(30, 2), torch.tensor([0] * 24 + [1] * 5 + [2] * 1)
    calibrate("crw", nn.Linear(2, 3), x, y, x, y, [24, 5, 1], epochs=3, batch_size=7)
    targets = torch.cat(recorded[0].targets)
    assert len(targets) == 3 * 30
    # re-weighting, not re-sampling: each epoch sees the instance distribution exactly
    assert torch.bincount(targets, minlength=3).tolist() == [72, 15, 3]


def test_crw_beats_unweighted_fine_tuning_on_a_long_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    xtr, ytr = _toy(190, 10, seed=0)
    xte, yte = _toy(500, 500, seed=1)
    head = _head_biased_to_class0()
    kw = {"epochs": 10, "lr": 0.1, "batch_size": 32, "seed": 0}
    crw = calibrate("crw", head, xtr, ytr, xte, yte, [190, 10], **kw).head  # type: ignore[arg-type]
    # the same procedure with every class weight 1
    monkeypatch.setattr(stage2, "class_balanced_weights", lambda counts: torch.ones(len(counts)))
    plain = calibrate("crw", head, xtr, ytr, xte, yte, [190, 10], **kw).head  # type: ignore[arg-type]
    before, bal_crw, bal_plain = (_balanced_accuracy(h, xte, yte) for h in (head, crw, plain))
    # measured: 0.63 before, 0.91 cRW (near the Bayes 0.92), 0.82 unweighted; seeds 0-4 alike
    assert bal_crw > 0.88, (before, bal_crw, bal_plain)
    assert bal_crw > bal_plain + 0.05, (before, bal_crw, bal_plain)
    # the tail class gets the larger share of the bias change
    assert float((crw.bias[1] - crw.bias[0]).detach()) > float((plain.bias[1] - plain.bias[0]).detach())


# ---------------------------------------------------------------------------------------------------------------
# DRS


def test_drs_defers_rebalancing_to_the_classifier_stage() -> None:
    # DRS = instance sampling while the representation is learnt (stage 1), then the same classifier
    # fine-tuned with class-balanced re-sampling (stage 2): those are the config defaults.
    cfg = load_config(None, ["stage2.method=drs"])
    assert cfg.stage1.q == 1.0 and not cfg.stage1.progressive and cfg.stage1.pk_classes == 0
    assert cfg.stage2.q == 0.0


@pytest.mark.parametrize(
    ("q", "expected_share"),
    [
        (1.0, [0.80, 0.16, 0.04]),  # before the deferral point: instance-balanced
        (0.0, [1 / 3, 1 / 3, 1 / 3]),  # after it (DRS's default): class-balanced
    ],
)
def test_drs_sample_class_histogram(recorded: list[_RecordingCE], q: float, expected_share: list[float]) -> None:
    counts = [80, 16, 4]
    y = torch.tensor(np.repeat(np.arange(3), counts))
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    epochs = 20
    calibrate("drs", nn.Linear(2, 3), x, y, x, y, counts, epochs=epochs, batch_size=32, q=q, seed=3)
    (loss,) = recorded
    assert loss.weight is None  # re-sampling, not re-weighting
    targets = torch.cat(loss.targets)
    share = (torch.bincount(targets, minlength=3).double() / len(targets)).tolist()
    assert share == pytest.approx(expected_share, abs=0.03), share
    # an epoch keeps the split's size in expectation (100 draws; stochastic rounding moves it by a few)
    assert abs(len(targets) / epochs - 100) < 5
    if q == 0.0:
        # the 4 tail images are each drawn ~8.3 times an epoch: a real re-sample, not a re-weighting
        assert int((targets == 2).sum()) > 6 * 4 * epochs


def test_drs_sampling_is_seeded(recorded: list[_RecordingCE]) -> None:
    counts = [20, 5]
    y = torch.tensor([0] * 20 + [1] * 5)
    x = torch.randn(25, 2)
    for seed in (0, 0, 1):
        calibrate("drs", nn.Linear(2, 2), x, y, x, y, counts, epochs=2, batch_size=8, q=0.0, seed=seed)
    a, b, c = (torch.cat(loss.targets) for loss in recorded)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_drs_trains_only_the_classifier_on_frozen_features() -> None:
    counts = [40, 8]
    xtr, ytr = _toy(40, 8, seed=2)
    xva, yva = _toy(20, 20, seed=3)
    xtr_before, xva_before = xtr.clone(), xva.clone()
    head = _head_biased_to_class0()
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    res = calibrate("drs", head, xtr, ytr, xva, yva, counts, epochs=3, lr=0.1, batch_size=16)
    # the features (the frozen backbone's output) and the stage-1 head are left as they were
    torch.testing.assert_close(xtr, xtr_before, rtol=0, atol=0)
    torch.testing.assert_close(xva, xva_before, rtol=0, atol=0)
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, head_before[k], rtol=0, atol=0)
    # the result is a plain linear classifier of the same shape, and it did train
    assert type(res.head) is nn.Linear
    assert (res.head.in_features, res.head.out_features) == (2, 2)
    assert not torch.allclose(res.head.bias, head.bias)
    losses = res.info["loss"]
    assert isinstance(losses, list) and len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_drs_fine_tunes_the_stage1_head_where_crt_reinitialises() -> None:
    x, y = _toy(30, 6, seed=4)
    head = _head_biased_to_class0()
    drs = calibrate("drs", head, x, y, x, y, [30, 6], epochs=1, lr=0.0, batch_size=8).head
    crt = calibrate("crt", head, x, y, x, y, [30, 6], epochs=1, lr=0.0, batch_size=8).head
    torch.testing.assert_close(drs.weight, head.weight, rtol=0, atol=0)
    torch.testing.assert_close(drs.bias, head.bias, rtol=0, atol=0)
    assert not torch.allclose(crt.weight, head.weight)


def test_drs_beats_instance_sampled_fine_tuning_on_a_long_tail() -> None:
    xtr, ytr = _toy(190, 10, seed=0)
    xte, yte = _toy(500, 500, seed=1)
    head = _head_biased_to_class0()
    kw = {"epochs": 10, "lr": 0.1, "batch_size": 32, "seed": 0}
    drs = calibrate("drs", head, xtr, ytr, xte, yte, [190, 10], q=0.0, **kw).head  # type: ignore[arg-type]
    plain = calibrate("drs", head, xtr, ytr, xte, yte, [190, 10], q=1.0, **kw).head  # type: ignore[arg-type]
    bal_drs, bal_plain = _balanced_accuracy(drs, xte, yte), _balanced_accuracy(plain, xte, yte)
    # measured: 0.91 class-balanced vs 0.82 instance-sampled; seeds 0-4 alike
    assert bal_drs > 0.88 and bal_drs > bal_plain + 0.05, (bal_drs, bal_plain)


# ---------------------------------------------------------------------------------------------------------------
# post-hoc logit adjustment (Menon et al., ICLR 2021): argmax_y z_y - tau * log pi_y, folded into the bias


def test_posthoc_la_bias_values() -> None:
    # counts [1, 3] -> pi = [1/4, 3/4]; bias 0 - log pi = [ln 4, ln 4/3] = [1.3862944, 0.2876821]
    x = torch.zeros(1, 2)
    res = calibrate("posthoc_la", _eye_head(), x, torch.tensor([0]), x, torch.tensor([0]), [1, 3])
    torch.testing.assert_close(res.head.bias.detach(), torch.tensor([1.3862944, 0.2876821]))
    torch.testing.assert_close(res.head.weight.detach(), torch.eye(2))  # only the bias moves
    assert res.info["tau"] == 1.0
    # tau 2 doubles the shift: [2 ln 4, 2 ln 4/3]
    res = calibrate("posthoc_la", _eye_head(), x, torch.tensor([0]), x, torch.tensor([0]), [1, 3], la_tau=2.0)
    torch.testing.assert_close(res.head.bias.detach(), torch.tensor([2.7725887, 0.5753641]))


def test_posthoc_la_flips_prediction_to_rare_class_and_tau_zero_is_identity() -> None:
    # features [0, 0.5] through the identity head predict the head class 1; adjusted [1.386, 0.788] the rare class 0
    x = torch.tensor([[0.0, 0.5]])
    head = _eye_head()
    assert int(head(x).argmax(1)) == 1
    res = calibrate("posthoc_la", head, x, torch.tensor([0]), x, torch.tensor([0]), [1, 3])
    assert int(res.head(x).argmax(1)) == 0
    assert torch.equal(head.bias.detach(), torch.zeros(2))  # the stage-1 head is copied, not changed
    same = calibrate("posthoc_la", head, x, torch.tensor([0]), x, torch.tensor([0]), [1, 3], la_tau=0.0)
    torch.testing.assert_close(same.head(x), head(x))
