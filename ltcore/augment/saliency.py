"""Spectral-residual static saliency in torch.

"Saliency Detection: A Spectral Residual Approach" (Hou & Zhang, CVPR 2007). For a grey image with Fourier
amplitude ``A`` and phase ``P``::

    L = log A;  R = L - h_3 * L          (h_3: 3 x 3 box filter)
    S = (g * |F^-1[exp(R + i P)]|)^2     (g: 5 x 5 Gaussian, sigma 8)

then min-max normalised to ``[0, 1]`` per image. This is OpenCV's ``StaticSaliencySpectralResidual``, the
static saliency the SPMix public code used (its maps are the reference of the tests): the map is computed on a
64 x 64 bilinear downscale of the grey image (no antialiasing, as OpenCV's ``INTER_LINEAR``) and resized back;
the filters use reflect-101 borders; the Gaussian blurs the magnitude, which is then squared (the paper writes
the blur after squaring; we follow the implementation). Differences from OpenCV, none of which matters to
SPMix: the amplitude is floored at ``eps`` times its maximum before the log (OpenCV takes ``log 0``), the grey
image is not rounded to 8 bits, and the map is min-max normalised rather than divided by its maximum (SPMix
min-max normalises its patch scores anyway, so both give the same scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["spectral_residual_saliency"]

# ITU-R BT.601 luma, the weights OpenCV's BGR2GRAY uses.
_GREY = (0.299, 0.587, 0.114)
# Relative spread below which an image or a map counts as flat.
_REL_TOL = 1e-6


def _gaussian_kernel(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Separable-normalised 2-D Gaussian kernel (1, 1, size, size)."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Same-size 2-D filtering of ``x (B, 1, h, w)`` with reflect padding (replicate where too small)."""
    k = kernel.shape[-1]
    pad = k // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode), kernel)


def spectral_residual_saliency(
    images: torch.Tensor,
    work_size: int | None = 64,
    blur_size: int = 5,
    blur_sigma: float = 8.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Spectral-residual saliency maps of RGB ``images (B, 3, H, W)`` -> ``(B, 1, H, W)`` in ``[0, 1]``.

    Args:
        images: float RGB batch (any intensity scale or normalisation; a per-image affine change of
            intensity changes at most the DC term).
        work_size: side of the square working resolution (64 in the paper and OpenCV); None works at
            ``(H, W)``.
        blur_size: odd side of the Gaussian kernel applied to the magnitude before squaring.
        blur_sigma: its standard deviation in working-resolution pixels.
        eps: floor on the Fourier amplitude before the log, relative to the image's largest amplitude, so
            empty frequencies stay finite.

    Returns:
        Saliency (B, 1, H, W), each map min-max normalised; a flat image (no grey-level variation) or a map
        with no variation gives all zeros.

    Raises:
        ValueError: if ``images`` is not a float (B, 3, H, W) tensor or a size argument is invalid.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor, got {images.dtype}; convert with .float()")
    if work_size is not None and work_size < 4:
        raise ValueError(f"work_size must be >= 4 or None, got {work_size}")
    if blur_size < 1 or blur_size % 2 == 0 or blur_sigma <= 0:
        raise ValueError(f"blur_size must be odd and >= 1 and blur_sigma > 0, got {blur_size}, {blur_sigma}")
    b, _, h, w = images.shape
    dtype = torch.promote_types(images.dtype, torch.float32)  # FFT in at least float32, also under AMP
    x = images.detach().to(dtype)
    weights = torch.tensor(_GREY, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    grey = (x * weights).sum(1, keepdim=True)  # (B, 1, H, W)
    if work_size is not None and (h, w) != (work_size, work_size):
        grey = F.interpolate(grey, size=(work_size, work_size), mode="bilinear", align_corners=False)

    spec = torch.fft.fft2(grey)  # (B, 1, h', w') complex
    amp = spec.abs()
    # Floor relative to the largest amplitude so the map stays independent of the intensity scale.
    floor = eps * amp.amax(dim=(-2, -1), keepdim=True) + torch.finfo(dtype).tiny
    log_amp = torch.log(torch.maximum(amp, floor))
    phase = torch.angle(spec)
    box = torch.full((1, 1, 3, 3), 1.0 / 9.0, dtype=dtype, device=x.device)
    residual = log_amp - _filter(log_amp, box)
    sal = torch.fft.ifft2(torch.polar(torch.exp(residual), phase)).abs()  # (B, 1, h', w')
    sal = _filter(sal, _gaussian_kernel(blur_size, blur_sigma, dtype, x.device)).pow(2)
    if sal.shape[-2:] != (h, w):
        sal = F.interpolate(sal, size=(h, w), mode="bilinear", align_corners=False)

    flat = sal.reshape(b, -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    # A flat image has no salient region (its spectrum is DC plus rounding noise) and a flat map carries no
    # information: both give zeros rather than amplified noise or a division by ~0.
    g = grey.reshape(b, -1)
    g_span = g.max(1, keepdim=True).values - g.min(1, keepdim=True).values
    flat_image = g_span <= _REL_TOL * g.abs().max(1, keepdim=True).values
    flat_map = span <= _REL_TOL * hi.abs()
    out = torch.where(
        flat_image | flat_map, torch.zeros_like(flat), (flat - lo) / span.clamp_min(torch.finfo(dtype).tiny)
    )
    return out.reshape(b, 1, h, w).clamp_(0.0, 1.0).to(images.dtype)
