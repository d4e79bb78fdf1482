from __future__ import annotations

import pytest
import torch

from ltcore.augment.saliency import spectral_residual_saliency
from ltcore.augment.spmix import SPMix, patch_scores, spmix

SAL_A = torch.tensor([[0.0, 1.0], [0.5, 0.25]]).view(1, 1, 2, 2)
SAL_B = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)


def test_patch_scores_hand_values() -> None:
    # min 0, max 1 -> 0.5 + 0.5 * v
    expected = torch.tensor([[[0.5, 1.0], [0.75, 0.625]]])
    torch.testing.assert_close(patch_scores(SAL_A, patch=1), expected)


def test_patch_scores_means_per_patch() -> None:
    sal = torch.zeros(1, 1, 4, 4)
    sal[0, 0, :2, :2] = 1.0  # patch means: [[1, 0], [0, 0]]
    sal[0, 0, 2:, 2:] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # mean 0.25
    # normalised [[1, 0], [0, 0.25]] -> [[1, 0.5], [0.5, 0.625]]
    torch.testing.assert_close(patch_scores(sal, patch=2), torch.tensor([[[1.0, 0.5], [0.5, 0.625]]]))


def test_patch_scores_constant_map_is_all_one() -> None:
    torch.testing.assert_close(patch_scores(torch.full((2, 1, 4, 4), 0.3), patch=2), torch.ones(2, 2, 2))


def test_spmix_hand_example() -> None:
    x_a = torch.full((1, 1, 2, 2), 10.0)
    x_b = torch.full((1, 1, 2, 2), 2.0)
    # s_a = [[0.5, 1], [0.75, 0.625]], s_b = [[1, 0.5], [0.5, 0.5]] -> max [[1, 1], [0.75, 0.625]]
    # r = min(0.8, max) = [[0.8, 0.8], [0.75, 0.625]]; e = 10 r + 2 (1 - r) = 2 + 8 r
    expected = torch.tensor([[8.4, 8.4], [8.0, 7.0]]).view(1, 1, 2, 2)
    torch.testing.assert_close(spmix(x_a, x_b, SAL_A, SAL_B, alpha=0.8, patch=1), expected)


def test_spmix_ratio_bounded_by_alpha() -> None:
    g = torch.Generator().manual_seed(0)
    sal_a, sal_b = torch.rand(3, 1, 8, 8, generator=g), torch.rand(3, 1, 8, 8, generator=g)
    for alpha in (0.3, 0.8):
        # x_a = 1, x_b = 0 makes the output equal to r
        r = spmix(torch.ones(3, 2, 8, 8), torch.zeros(3, 2, 8, 8), sal_a, sal_b, alpha=alpha, patch=2)
        assert r.max() <= alpha + 1e-7
        assert r.min() >= min(alpha, 0.5) - 1e-7  # scores live in [0.5, 1]
        assert torch.equal(r[:, 0], r[:, 1])  # the same ratio on every channel


def test_spmix_alpha_one_and_both_salient_keeps_tail() -> None:
    x_a, x_b = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)
    ones = torch.ones(1, 1, 4, 4)  # flat maps score 1 everywhere -> r = alpha = 1 -> tail image
    torch.testing.assert_close(spmix(x_a, x_b, ones, ones, alpha=1.0, patch=2), x_a)


def test_not_divisible_raises() -> None:
    x, s = torch.zeros(1, 3, 10, 10), torch.zeros(1, 1, 10, 10)
    with pytest.raises(ValueError, match="not divisible by patch=4"):
        spmix(x, x, s, s, patch=4)
    with pytest.raises(ValueError, match="not divisible"):
        patch_scores(s, patch=3)
    with pytest.raises(ValueError, match="not divisible"):
        SPMix(patch=4)(x, torch.zeros(1, dtype=torch.long), x, torch.Generator())


def _batch(b: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x_tail, x_head = torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)
    return x_tail, torch.arange(b), x_head


def test_prob_zero_is_identity() -> None:
    x_tail, y_tail, x_head = _batch()
    images, labels = SPMix(prob=0.0, patch=8)(x_tail, y_tail, x_head, torch.Generator().manual_seed(0))
    assert torch.equal(images, x_tail) and torch.equal(labels, y_tail)


def test_prob_one_mixes_all_and_keeps_tail_label() -> None:
    x_tail, y_tail, x_head = _batch()
    images, labels = SPMix(prob=1.0, patch=8)(x_tail, y_tail, x_head, torch.Generator().manual_seed(0))
    expected = spmix(x_tail, x_head, spectral_residual_saliency(x_tail), spectral_residual_saliency(x_head), 0.8, 8)
    torch.testing.assert_close(images, expected)
    assert torch.equal(labels, y_tail)


def test_partial_prob_mixes_some_reproducibly() -> None:
    x_tail, y_tail, x_head = _batch(b=16)
    sal_t, sal_h = torch.rand(16, 1, 16, 16), torch.rand(16, 1, 16, 16)
    aug = SPMix(prob=0.5, patch=4)
    out1, labels = aug(x_tail, y_tail, x_head, torch.Generator().manual_seed(5), sal_tail=sal_t, sal_head=sal_h)
    out2, _ = aug(x_tail, y_tail, x_head, torch.Generator().manual_seed(5), sal_tail=sal_t, sal_head=sal_h)
    assert torch.equal(out1, out2)
    assert torch.equal(labels, y_tail)
    mixed = spmix(x_tail, x_head, sal_t, sal_h, alpha=0.8, patch=4)
    kept = [torch.equal(out1[i], x_tail[i]) for i in range(16)]
    for i in range(16):  # every sample is either untouched or exactly its SPMix
        assert kept[i] or torch.allclose(out1[i], mixed[i])
    assert 0 < sum(kept) < 16


def test_bad_arguments() -> None:
    for kwargs in ({"alpha": 1.5}, {"prob": -0.1}, {"patch": 0}):
        with pytest.raises(ValueError):
            SPMix(**kwargs)


def _colour_images(seed: int) -> torch.Tensor:
    """Raw RGB images in [0, 1] (4, 3, 32, 32): noise with a red square and a blue square (colour structure that a
    per-channel normalisation re-weights)."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 4:12, 4:12] += 0.8
    x[:, 2, 18:28, 18:28] += 0.8
    return x.clamp(0, 1)


def test_saliency_is_computed_before_normalisation() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as the engine normalises batches
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    raw_tail, raw_head = _colour_images(0), _colour_images(1)
    y = torch.arange(4)
    # reference: mix the raw images (saliency of the raw images), then normalise the result
    ref, _ = SPMix(alpha=0.8, patch=8, prob=1.0)(raw_tail, y, raw_head, torch.Generator().manual_seed(0))
    ref = (ref - m) / s
    # SPMix told the normalisation: normalised in, the same normalised mix out (the mix commutes with it)
    mixer = SPMix(alpha=0.8, patch=8, prob=1.0, mean=mean, std=std)
    out, _ = mixer((raw_tail - m) / s, y, (raw_head - m) / s, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixer.saliency((raw_tail - m) / s), spectral_residual_saliency(raw_tail), atol=1e-4,
                               rtol=0)
    # without it, the saliency of the normalised images differs, and so does the mix: the check above can fail
    naive, _ = SPMix(alpha=0.8, patch=8, prob=1.0)((raw_tail - m) / s, y, (raw_head - m) / s,
                                                   torch.Generator().manual_seed(0))
    assert float((naive - ref).abs().max()) > 1e-2


def test_mean_and_std_come_together() -> None:
    with pytest.raises(ValueError, match="both mean and std"):
        SPMix(mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="std must be positive"):
        SPMix(mean=(0.5, 0.5, 0.5), std=(0.2, 0.0, 0.2))
