from __future__ import annotations

import pytest
import torch

from ltcore.augment.saliency import spectral_residual_saliency


def _blob_image(
    size: int = 64, centre: tuple[int, int] = (16, 20), radius: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    blob = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2).float()  # (H, W)
    image = (0.2 + 0.7 * blob).expand(3, size, size).unsqueeze(0).clone()  # bright disc on a flat background
    return image, blob.bool()


@pytest.mark.parametrize("work_size", [64, None, 32])
def test_blob_is_more_salient_than_far_background(work_size: int | None) -> None:
    image, blob = _blob_image()
    sal = spectral_residual_saliency(image, work_size=work_size)[0, 0]
    inside = sal[blob].mean()
    far = sal[44:, 44:].mean()  # the corner opposite the blob
    assert inside > 0.3
    assert inside > 20 * far


def test_shape_and_range_per_image() -> None:
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    sal = spectral_residual_saliency(images)
    assert sal.shape == (2, 1, 32, 48) and sal.dtype == images.dtype
    torch.testing.assert_close(sal.amin(dim=(1, 2, 3)), torch.zeros(2))  # min-max normalised per image
    torch.testing.assert_close(sal.amax(dim=(1, 2, 3)), torch.ones(2))


@pytest.mark.parametrize("value", [0.0, 0.5, 255.0])
def test_constant_image_gives_zeros_not_nan(value: float) -> None:
    sal = spectral_residual_saliency(torch.full((2, 3, 16, 16), value))
    assert torch.isfinite(sal).all()
    assert torch.equal(sal, torch.zeros_like(sal))


def test_intensity_scale_invariance() -> None:
    image, _ = _blob_image()
    torch.testing.assert_close(
        spectral_residual_saliency(5 * image), spectral_residual_saliency(image), atol=1e-5, rtol=0
    )


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="images"):
        spectral_residual_saliency(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="float"):
        spectral_residual_saliency(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="blur_size"):
        spectral_residual_saliency(torch.zeros(1, 3, 8, 8), blur_size=4)
