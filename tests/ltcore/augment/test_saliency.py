from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

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


# ---------------------------------------------------------------- reference implementations


def _natural_images() -> list[np.ndarray]:
    """A few natural RGB uint8 images (H, W, 3) bundled with scikit-image, plus a synthetic colour scene."""
    data = pytest.importorskip("skimage.data")
    yy, xx = np.mgrid[0:96, 0:128]
    rng = np.random.default_rng(0)
    synth = rng.integers(0, 60, size=(96, 128, 3)).astype(np.float64)
    synth[(yy - 30) ** 2 + (xx - 50) ** 2 < 14**2] += (150, 80, 20)  # an orange disc
    synth[60:80, 80:115] += (20, 60, 160)  # a blue box
    return [data.astronaut(), data.coffee(), data.chelsea(), np.clip(synth, 0, 255).astype(np.uint8)]


def _numpy_reference(grey: np.ndarray) -> np.ndarray:
    """The spectral residual of a grey image (h, w) at its own resolution, NumPy + SciPy, min-max normalised:
    ``R = log A - box3(log A)``, ``S = gauss5(|ifft(exp(R + iP))|)^2`` with reflect-101 ('mirror') borders."""
    spec = np.fft.fft2(grey)
    log_amp = np.log(np.abs(spec))
    residual = log_amp - ndimage.uniform_filter(log_amp, size=3, mode="mirror")
    mag = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spec))))
    sal = ndimage.gaussian_filter(mag, sigma=8.0, truncate=0.25, mode="mirror") ** 2  # radius 0.25 * 8 = 2: 5 x 5
    return (sal - sal.min()) / (sal.max() - sal.min())


def test_matches_numpy_reference_at_full_resolution() -> None:
    for img in _natural_images():
        small = img[::8, ::8].astype(np.float64)  # a (h, w, 3) thumbnail, 38 x 64 up to 64 x 75
        grey = small @ np.array([0.299, 0.587, 0.114])
        ref = _numpy_reference(grey)
        ours = spectral_residual_saliency(torch.tensor(small).permute(2, 0, 1)[None], work_size=None)[0, 0]
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-9)


def _opencv_saliency(bgr_or_grey: np.ndarray) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    ok, sal = cv2.saliency.StaticSaliencySpectralResidual_create().computeSaliency(bgr_or_grey)
    assert ok
    sal = sal.astype(np.float64)
    return (sal - sal.min()) / (sal.max() - sal.min())  # OpenCV divides by the max; ours is min-max


def test_matches_opencv_on_64x64_grey_images() -> None:
    # At OpenCV's working size there is no resizing, and a uint8 grey image leaves no rounding to differ on; what
    # remains is OpenCV's fast phase approximation in cartToPolar (~2e-4 rad): up to ~1.2e-3 on the map, 1e-4 on
    # average. The paper's order (blur after squaring) would be ~0.08 away.
    cv2 = pytest.importorskip("cv2")
    for img in _natural_images():
        grey = cv2.cvtColor(cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)  # uint8
        ref = _opencv_saliency(grey)
        rgb = torch.tensor(grey, dtype=torch.float64).expand(3, 64, 64)[None]  # R = G = B: our grey is the same
        ours = spectral_residual_saliency(rgb)[0, 0].numpy()
        np.testing.assert_allclose(ours, ref, atol=3e-3, rtol=0)
        assert np.abs(ours - ref).mean() < 3e-4


def test_close_to_opencv_on_colour_images_of_other_sizes() -> None:
    # OpenCV rounds its grey image and the 64 x 64 downscale to 8 bits; ours does not. That leaves differences of
    # about 0.015 at most on maps in [0, 1]; the paper's blur-after-square order, or an antialiased downscale,
    # would differ by 0.15 to 0.3.
    for img in _natural_images():
        for size in ((150, 200), (224, 224)):
            rgb = _resize(img, size)
            ref = _opencv_saliency(np.ascontiguousarray(rgb[:, :, ::-1]))  # OpenCV takes BGR
            ours = spectral_residual_saliency(torch.tensor(rgb, dtype=torch.float64).permute(2, 0, 1)[None])
            diff = np.abs(ours[0, 0].numpy() - ref)
            assert diff.max() < 0.03 and diff.mean() < 0.005, (size, diff.max(), diff.mean())


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)  # (H, W, 3) uint8
