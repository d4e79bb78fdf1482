from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltcore.losses.ldam import LDAMLoss

# counts [16, 1]: n^{-1/4} = [1/2, 1]; scaled so the largest is 0.5 -> margins [0.25, 0.5]
COUNTS = [16, 1]
Z = torch.zeros(2, 2)
Y = torch.tensor([0, 1])
# s = 1, y=0: logits [0 - 0.25, 0] -> -log(e^-0.25 / (e^-0.25 + 1)) = log(1 + e^0.25) = 0.8259394
# s = 1, y=1: logits [0, 0 - 0.5]  -> log(1 + e^0.5) = 0.9740770
ROW0, ROW1 = 0.8259394198788436, 0.9740769841801067


def test_margins() -> None:
    torch.testing.assert_close(LDAMLoss(COUNTS).margins, torch.tensor([0.25, 0.5]))
    # max_margin scales all margins: [0.5, 1.0]
    torch.testing.assert_close(LDAMLoss(COUNTS, max_margin=1.0).margins, torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize(
    ("logits", "target", "kwargs", "expected"),
    [
        (Z[:1], Y[:1], {"s": 1.0}, ROW0),
        (Z[1:], Y[1:], {"s": 1.0}, ROW1),
        # mean of the two rows: (0.8259394 + 0.9740770) / 2 = 0.9000082
        (Z, Y, {"s": 1.0}, (ROW0 + ROW1) / 2),
        # s = 2, y=1: 2 * [0, -0.5] = [0, -1] -> log(1 + e) = 1.3132617
        (Z[1:], Y[1:], {"s": 2.0}, 1.3132616875182228),
        # weight [1, 3]: (1 * 0.8259394 + 3 * 0.9740770) / (1 + 3) = 0.9370426
        (Z, Y, {"s": 1.0, "weight": [1.0, 3.0]}, 0.937042593104791),
    ],
)
def test_values(logits: torch.Tensor, target: torch.Tensor, kwargs: dict, expected: float) -> None:
    loss = LDAMLoss(COUNTS, **kwargs)(logits, target)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_weight_switch_per_epoch() -> None:
    loss = LDAMLoss(COUNTS, s=1.0)
    assert loss(Z, Y).item() == pytest.approx((ROW0 + ROW1) / 2, rel=1e-6)
    loss.set_weight(torch.tensor([1.0, 3.0]))  # DRW from here on
    assert loss(Z, Y).item() == pytest.approx(0.937042593104791, rel=1e-6)
    loss.set_weight(None)
    assert loss(Z, Y).item() == pytest.approx((ROW0 + ROW1) / 2, rel=1e-6)
    # a weight passed to forward applies to that call only
    assert loss(Z, Y, weight=[1.0, 3.0]).item() == pytest.approx(0.937042593104791, rel=1e-6)
    assert loss.weight is None


@pytest.mark.parametrize("weight", [None, [0.2, 1.0, 3.0]])
def test_zero_margin_unit_scale_equals_cross_entropy(weight: list[float] | None) -> None:
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(7, 3, generator=g), torch.randint(0, 3, (7,), generator=g)
    w = None if weight is None else torch.tensor(weight)
    torch.testing.assert_close(
        LDAMLoss([100, 10, 1], max_margin=0.0, s=1.0)(z, y, weight=weight), F.cross_entropy(z, y, weight=w)
    )


def test_margin_raises_loss_only_through_true_class() -> None:
    # a margin makes the problem harder: the loss grows over plain (scaled) CE
    g = torch.Generator().manual_seed(4)
    z, y = torch.randn(7, 3, generator=g), torch.randint(0, 3, (7,), generator=g)
    assert LDAMLoss([100, 10, 1], s=5.0)(z, y) > F.cross_entropy(5.0 * z, y)


def test_gradient_finite() -> None:
    z = torch.tensor([[1.0, -1.0], [0.9, 0.1]], requires_grad=True)  # cosine-like logits, s = 30
    LDAMLoss(COUNTS, weight=[1.0, 2.0])(z, Y).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([4, 0],), {}, r"class_counts\[1\].*>= 1 training sample"),
        ((COUNTS,), {"max_margin": -0.1}, "max_margin"),
        ((COUNTS,), {"s": 0.0}, "s must be"),
        ((COUNTS,), {"weight": [1.0, 2.0, 3.0]}, "weight has 3 entries"),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LDAMLoss(*args, **kwargs)


def test_logit_width_mismatch() -> None:
    with pytest.raises(ValueError, match="3 classes"):
        LDAMLoss(COUNTS)(torch.zeros(2, 3), Y)
