from __future__ import annotations

import numpy as np
import pytest
import torch

from ltcore.losses.class_balanced import DeferredReweighting, as_class_counts, class_balanced_weights


@pytest.mark.parametrize(
    ("counts", "beta", "expected"),
    [
        # effective numbers E_n = (1 - beta^n) / (1 - beta) with beta = 1/2: E_1 = 1, E_2 = 1.5
        #   w = 1/E = [1, 2/3], sum 5/3, rescaled to sum 2: [6/5, 4/5]
        ([1, 2], 0.5, [1.2, 0.8]),
        # beta = 1/2: E = [1, 1.5, 1.75], w = [1, 2/3, 4/7] = [21, 14, 12] / 21, sum 47/21
        #   rescaled to sum 3: [63, 42, 36] / 47
        ([1, 2, 3], 0.5, [63 / 47, 42 / 47, 36 / 47]),
        # beta = 0: every class has effective number 1 -> all ones
        ([1, 50, 7], 0.0, [1.0, 1.0, 1.0]),
        # default beta 0.9999 on counts [1, 2]: 1 - beta^2 = 1.9999e-4, so w ~ [1.9999, 1] / 2.9999 * 2
        ([1, 2], 0.9999, [2 * 1.9999 / 2.9999, 2 * 1 / 2.9999]),
    ],
)
def test_values(counts: list[int], beta: float, expected: list[float]) -> None:
    w = class_balanced_weights(counts, beta=beta)
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_equal_counts_give_ones_and_sum_is_c() -> None:
    torch.testing.assert_close(class_balanced_weights([7, 7, 7, 7]), torch.ones(4))
    w = class_balanced_weights([6705, 1113, 1099, 514, 327, 142, 115])  # HAM10000 class sizes
    assert w.sum().item() == pytest.approx(7.0, rel=1e-6)
    assert torch.all(w[:-1] <= w[1:])  # rarer class, larger weight


@pytest.mark.parametrize(
    "counts", [[3, 1, 2], (3, 1, 2), np.array([3, 1, 2]), torch.tensor([3, 1, 2]), [3.0, 1.0, 2.0]]
)
def test_counts_any_sequence(counts: object) -> None:
    assert as_class_counts(counts).tolist() == [3, 1, 2]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        ([5, 0, 3], r"class_counts\[1\].*>= 1 training sample"),
        ([5, 3, -2], r"class_counts\[2\].*>= 1 training sample"),
        ([5, 2.5], r"class_counts\[1\].*whole number"),
        ([], "non-empty"),
        ([[1, 2]], "1-D"),
        (["a", "b"], "integers"),
    ],
)
def test_bad_counts(counts: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        class_balanced_weights(counts)  # type: ignore[arg-type]


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5])
def test_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights([1, 2], beta=beta)


def test_drw_switches_at_start_epoch() -> None:
    drw = DeferredReweighting([1, 2], start_epoch=3, beta=0.5)
    assert drw.weight(0) is None
    assert drw.weight(2) is None
    # from epoch 3 on the CB weights of test_values' first case: [6/5, 4/5]
    torch.testing.assert_close(drw.weight(3), torch.tensor([1.2, 0.8]))
    torch.testing.assert_close(drw.weight(10), torch.tensor([1.2, 0.8]))


def test_drw_start_zero_weights_from_first_epoch() -> None:
    assert DeferredReweighting([1, 2], start_epoch=0).weight(0) is not None


def test_drw_returns_copies() -> None:
    drw = DeferredReweighting([1, 2], start_epoch=0, beta=0.5)
    w = drw.weight(0)
    assert w is not None
    w.zero_()
    torch.testing.assert_close(drw.weight(0), torch.tensor([1.2, 0.8]))


def test_drw_bad_arguments() -> None:
    with pytest.raises(ValueError, match="start_epoch"):
        DeferredReweighting([1, 2], start_epoch=-1)
    with pytest.raises(ValueError, match="epoch"):
        DeferredReweighting([1, 2], start_epoch=1).weight(-1)
    with pytest.raises(ValueError, match=r"class_counts\[0\]"):
        DeferredReweighting([0, 2], start_epoch=1)
