from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ltcore.config import TAU_GRID as DEFAULT_TAUS
from ltcore.methods.calibrators import LWSClassifier, reinit_linear, select_tau, tau_normalize

# row norms 5 and 2
W = torch.tensor([[3.0, 4.0], [0.0, 2.0]])


@pytest.mark.parametrize(
    ("tau", "expected"),
    [
        # tau 1: unit rows [3, 4] / 5, [0, 2] / 2
        (1.0, [[0.6, 0.8], [0.0, 1.0]]),
        # tau 0.5: [3, 4] / sqrt 5 = [1.3416408, 1.7888544], [0, 2] / sqrt 2 = [0, 1.4142136]
        (0.5, [[1.3416408, 1.7888544], [0.0, 1.4142136]]),
        # tau 2: [3, 4] / 25, [0, 2] / 4
        (2.0, [[0.12, 0.16], [0.0, 0.5]]),
    ],
)
def test_tau_normalize_values(tau: float, expected: list[list[float]]) -> None:
    torch.testing.assert_close(tau_normalize(W, tau), torch.tensor(expected))


def test_tau_zero_changes_nothing() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # a zero row is fine when nothing is divided
    out = tau_normalize(w, 0.0)
    torch.testing.assert_close(out, w, rtol=0, atol=0)
    assert out.data_ptr() != w.data_ptr()


def test_tau_normalize_leaves_input_alone() -> None:
    w = W.clone()
    tau_normalize(w, 1.0)
    torch.testing.assert_close(w, W, rtol=0, atol=0)


def test_tau_normalize_bad_input() -> None:
    with pytest.raises(ValueError, match="row 1 has zero norm"):
        tau_normalize(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 1.0)
    with pytest.raises(ValueError, match=r"\(C, D\)"):
        tau_normalize(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="tau"):
        tau_normalize(W, float("inf"))


# Head class 0 has the larger row norm (2 vs 1). Sample a = [1, 1.5] (class 1) gets logits
# [2 / 2^tau, 1.5]: right only when 2^{1 - tau} < 1.5, i.e. tau > 1 - log2(1.5) = 0.415.
# Sample b = [1, 0] (class 0) gets [2 / 2^tau, 0]: always right.
# So balanced accuracy is (1 + 0) / 2 = 0.5 for tau <= 0.4 (2^0.6 = 1.516 > 1.5) and 1.0 from tau 0.5 on.
SEL_W = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
SEL_X = torch.tensor([[1.0, 1.5], [1.0, 0.0]])
SEL_Y = torch.tensor([1, 0])


def test_select_tau_picks_smallest_best() -> None:
    best, scores = select_tau(SEL_X, SEL_Y, SEL_W)
    assert list(scores) == list(DEFAULT_TAUS)
    assert len(scores) == 21 and DEFAULT_TAUS[0] == 0.0 and DEFAULT_TAUS[-1] == 2.0
    assert scores[0.0] == 0.5
    assert scores[0.4] == 0.5
    assert scores[0.5] == 1.0
    assert scores[2.0] == 1.0
    assert best == 0.5  # 0.5 ... 2.0 tie at 1.0; the smallest wins


def test_select_tau_tie_goes_to_smallest_in_any_order() -> None:
    best, scores = select_tau(SEL_X, SEL_Y, SEL_W, taus=(1.5, 0.7, 1.0))
    assert scores == {1.5: 1.0, 0.7: 1.0, 1.0: 1.0}
    assert best == 0.7


def test_select_tau_zero_only_is_plain_classifier() -> None:
    best, scores = select_tau(SEL_X, SEL_Y, SEL_W, taus=(0.0,))
    assert best == 0.0
    assert scores == {0.0: 0.5}  # plain x @ W.T predicts class 0 for both samples


def test_select_tau_bad_input() -> None:
    with pytest.raises(ValueError, match="taus"):
        select_tau(SEL_X, SEL_Y, SEL_W, taus=())
    with pytest.raises(ValueError, match="labels"):
        select_tau(SEL_X, SEL_Y[:1], SEL_W)
    with pytest.raises(ValueError, match="weight"):
        select_tau(SEL_X, SEL_Y, torch.ones(2, 3))


def _linear(bias: bool = True) -> nn.Linear:
    lin = nn.Linear(2, 2, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        if bias:
            lin.bias.copy_(torch.tensor([0.5, -1.0]))
    return lin


def test_lws_value() -> None:
    lws = LWSClassifier(_linear())
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([2.0, 0.5]))
    # W x + b for x = [1, 1]: [1 + 2 + 0.5, 3 + 4 - 1] = [3.5, 6]; times scales [2, 0.5] -> [7, 3]
    torch.testing.assert_close(lws(torch.tensor([[1.0, 1.0]])), torch.tensor([[7.0, 3.0]]))
    # the folded linear layer computes the same
    torch.testing.assert_close(lws.to_linear()(torch.tensor([[1.0, 1.0]])), torch.tensor([[7.0, 3.0]]))


@pytest.mark.parametrize("bias", [True, False])
def test_lws_unit_scales_equal_linear(bias: bool) -> None:
    lin = _linear(bias)
    x = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    lws = LWSClassifier(lin)
    torch.testing.assert_close(lws.scales.detach(), torch.ones(2))
    torch.testing.assert_close(lws(x), lin(x))


def test_lws_only_scales_learn() -> None:
    lin = _linear()
    lws = LWSClassifier(lin)
    assert [name for name, _ in lws.named_parameters()] == ["scales"]
    assert not lws.weight.requires_grad and lws.bias is not None and not lws.bias.requires_grad
    opt = torch.optim.SGD(lws.parameters(), lr=0.1)
    x = torch.tensor([[1.0, 1.0]])
    out = lws(x)
    out.sum().backward()
    # d/df_j sum_j f_j (w_j x + b_j) = w_j x + b_j = [3.5, 6]
    assert lws.scales.grad is not None
    torch.testing.assert_close(lws.scales.grad, torch.tensor([3.5, 6.0]))
    opt.step()
    torch.testing.assert_close(lws.scales.detach(), torch.tensor([1.0 - 0.35, 1.0 - 0.6]))
    torch.testing.assert_close(lws.weight, _linear().weight.detach(), rtol=0, atol=0)


def test_lws_copies_the_linear_layer() -> None:
    lin = _linear()
    lws = LWSClassifier(lin)
    with torch.no_grad():
        lin.weight.zero_()
    torch.testing.assert_close(lws.weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert lin.weight.requires_grad  # the original is left trainable


def test_reinit_linear_shape_and_determinism() -> None:
    lin = _linear()
    state = torch.get_rng_state()
    a = reinit_linear(lin, generator=torch.Generator().manual_seed(0))
    b = reinit_linear(lin, generator=torch.Generator().manual_seed(0))
    c = reinit_linear(lin, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert a is not lin and a.weight.shape == (2, 2) and a.bias is not None and a.bias.shape == (2,)
    assert a.weight.requires_grad and a.weight.dtype == lin.weight.dtype
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=0)
    assert not torch.equal(a.weight, c.weight)
    torch.testing.assert_close(lin.weight, _linear().weight, rtol=0, atol=0)  # original unchanged
    assert reinit_linear(_linear(bias=False), generator=torch.Generator().manual_seed(0)).bias is None


def test_reinit_linear_matches_default_nn_linear_init() -> None:
    # same draws as nn.Linear's own init from an equally seeded global RNG; all within +-1/sqrt(D)
    lin = nn.Linear(16, 5)
    with torch.random.fork_rng():
        torch.manual_seed(123)
        ref = nn.Linear(16, 5)
    out = reinit_linear(lin, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(out.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(out.bias, ref.bias, rtol=0, atol=0)
    assert out.weight.abs().max() <= 1 / math.sqrt(16) and out.bias.abs().max() <= 1 / math.sqrt(16)
