from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltcore.augment.mix import cutmix, mix_criterion, mixup


def _images(b: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    # image i is filled with the value i, so a pixel tells which image it came from; y = arange gives perm = y_b
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, size, size).clone()
    return x, torch.arange(b)


@pytest.mark.parametrize("fn", [mixup, cutmix])
def test_lam_one_is_identity(fn) -> None:
    x, y = _images()
    for kwargs in ({"alpha": 1.0, "lam": 1.0}, {"alpha": 0.0}):
        out, y_a, _, lam = fn(x, y, generator=torch.Generator().manual_seed(0), **kwargs)
        assert lam == 1.0
        assert torch.equal(out, x) and torch.equal(y_a, y)


def test_mixup_hand_value() -> None:
    x, y = _images(b=3, size=2)
    out, y_a, y_b, lam = mixup(x, y, alpha=1.0, generator=torch.Generator().manual_seed(0), lam=0.3)
    assert lam == 0.3 and torch.equal(y_a, y)
    # image i is constant i: mixed value = 0.3 * i + 0.7 * perm(i)
    expected = 0.3 * y.float() + 0.7 * y_b.float()
    torch.testing.assert_close(out[:, 0, 0, 0], expected)


def test_mixup_draw_is_reproducible_and_in_range() -> None:
    x, y = _images()
    a = mixup(x, y, alpha=0.4, generator=torch.Generator().manual_seed(7))
    b = mixup(x, y, alpha=0.4, generator=torch.Generator().manual_seed(7))
    assert a[3] == b[3] and torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert 0.0 < a[3] < 1.0


def test_cutmix_box_area_matches_lam() -> None:
    x, y = _images(b=4, size=16)
    checked = 0
    for seed in range(6):
        out, y_a, y_b, lam = cutmix(x, y, alpha=1.0, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(y_a, y)
        for i in range(4):
            pasted = (out[i] != x[i]).float().mean().item()  # fraction of pixels taken from image perm(i)
            if int(y_b[i]) != i:
                assert pasted == pytest.approx(1.0 - lam, abs=1e-9)
                checked += pasted > 0
            assert set(out[i].unique().tolist()) <= {float(i), float(y_b[i])}
    assert checked > 0  # some box was actually pasted from another image


def test_cutmix_forced_lam_box_size() -> None:
    x, y = _images(b=2, size=16)
    _, _, _, lam = cutmix(x, y, alpha=1.0, generator=torch.Generator().manual_seed(0), lam=0.75)
    # side = sqrt(1 - 0.75) * 16 = 8 -> at most an 8 x 8 box (64 / 256 = 0.25), less if clipped at the border
    assert 0.75 <= lam <= 1.0


def test_mix_criterion_hand_value() -> None:
    logits = torch.tensor([[2.0, 0.0]])
    loss = mix_criterion(F.cross_entropy, logits, torch.tensor([0]), torch.tensor([1]), 0.5)
    # CE to class 0: log(1 + e^-2) = 0.126928; to class 1: log(1 + e^2) = 2.126928; half of each: 1.126928
    expected = 0.5 * math.log(1 + math.exp(-2)) + 0.5 * math.log(1 + math.exp(2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bad_arguments() -> None:
    x, y = _images()
    g = torch.Generator()
    with pytest.raises(ValueError, match="alpha"):
        mixup(x, y, alpha=-1.0, generator=g)
    with pytest.raises(ValueError, match="lam"):
        cutmix(x, y, alpha=1.0, generator=g, lam=1.5)
    with pytest.raises(ValueError, match="rows"):
        mixup(x, y[:2], alpha=1.0, generator=g)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        cutmix(x[:, 0, 0], y, alpha=1.0, generator=g)
