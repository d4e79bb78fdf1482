"""SPMix: saliency-guided, patch-based mixing of a tail image with a head image.

"Saliency-guided and Patch-based Mixup for Long-tailed Skin Cancer Image Classification" (SPMix;
Wei et al., arXiv 2406.10801). Per image, patch scores are the mean saliency of each ``p x p`` patch,
min-max normalised and mapped to ``[0.5, 1]``; patch i of tail image A and head image B is mixed as::

    r_i = min(alpha, max(s_i^A, s_i^B))
    e_i = r_i * x_i^A + (1 - r_i) * x_i^B

and the mixed image keeps the tail label ``y^A`` (no label mixing). alpha = 0.8, p = 16.

**Interpretation / what we ship** (METHODS.md section 5): mixing happens in image space (works with any
backbone); saliency comes from the spectral-residual static method computed on the fly
(:func:`~ltcore.augment.saliency.spectral_residual_saliency`) unless precomputed maps are passed; each sample
is mixed with probability ``prob`` and an unmixed sample is returned as its tail image unchanged. Drawing A
class-balanced and B instance-balanced is the data pipeline's job.

Saliency is computed on the image before normalisation: the spectral-residual map of a per-channel normalised
image ``(x - mean) / std`` is not the map of ``x`` (the channel offsets and scales change the grey image). With
``mean`` and ``std`` given, :class:`SPMix` undoes the normalisation for the saliency and mixes the normalised
images as they are: the mix is a convex combination per pixel, so it commutes with the per-channel affine
normalisation, and the result equals normalising the mix of the raw images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ltcore.augment.saliency import spectral_residual_saliency

__all__ = ["SPMix", "patch_scores", "spmix"]


def _check_patch(h: int, w: int, patch: int, what: str) -> None:
    if patch < 1:
        raise ValueError(f"patch must be >= 1, got {patch}")
    if h % patch or w % patch:
        raise ValueError(
            f"{what} size {h}x{w} is not divisible by patch={patch}; resize/crop to a multiple of {patch} "
            "or choose a patch size that divides it"
        )


def patch_scores(saliency: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """Per-patch scores in ``[0.5, 1]`` from saliency maps ``(B, 1, H, W)`` -> ``(B, H/patch, W/patch)``.

    ``s = 0.5 + 0.5 * (m - min m) / (max m - min m)`` with ``m`` the mean saliency of each patch, min and max
    taken per image. A map whose patch means are all equal carries no information on where the
    discriminative region is; its scores are all 1, so the mix keeps as much of the tail image as ``alpha``
    allows (``r = alpha`` everywhere) rather than letting the head image's saliency decide.

    Raises:
        ValueError: if ``saliency`` is not (B, 1, H, W) or H, W are not multiples of ``patch``.
    """
    if saliency.ndim != 4 or saliency.shape[1] != 1:
        raise ValueError(f"saliency must be (B, 1, H, W), got {tuple(saliency.shape)}")
    _check_patch(saliency.shape[2], saliency.shape[3], patch, "saliency")
    dtype = torch.promote_types(saliency.dtype, torch.float32)
    m = F.avg_pool2d(saliency.to(dtype), kernel_size=patch, stride=patch).squeeze(1)  # (B, h, w)
    flat = m.flatten(1)
    lo = flat.min(1).values[:, None, None]
    span = flat.max(1).values[:, None, None] - lo
    flat_map = span <= 1e-12
    norm = (m - lo) / torch.where(flat_map, torch.ones_like(span), span)
    return torch.where(flat_map, torch.ones_like(m), 0.5 + 0.5 * norm)


def spmix(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    sal_a: torch.Tensor,
    sal_b: torch.Tensor,
    alpha: float = 0.8,
    patch: int = 16,
) -> torch.Tensor:
    """Mix images patch by patch: ``e = r * x_a + (1 - r) * x_b`` with ``r = min(alpha, max(s_a, s_b))``.

    Args:
        x_a: tail images (B, C, H, W); their label is kept.
        x_b: head images (B, C, H, W).
        sal_a: saliency of ``x_a`` (B, 1, H, W).
        sal_b: saliency of ``x_b`` (B, 1, H, W).
        alpha: cap on the tail share of every patch, in ``[0, 1]``.
        patch: patch side in pixels; must divide H and W.

    Returns:
        Mixed images (B, C, H, W) in ``x_a``'s dtype.

    Raises:
        ValueError: on shape mismatch, ``alpha`` outside ``[0, 1]``, or H, W not divisible by ``patch``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if x_a.ndim != 4 or x_a.shape != x_b.shape:
        raise ValueError(f"x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} must both be (B, C, H, W)")
    b, _, h, w = x_a.shape
    for name, sal in (("sal_a", sal_a), ("sal_b", sal_b)):
        if sal.shape != (b, 1, h, w):
            raise ValueError(f"{name} must be ({b}, 1, {h}, {w}) to match the images, got {tuple(sal.shape)}")
    _check_patch(h, w, patch, "image")
    s = torch.maximum(patch_scores(sal_a, patch), patch_scores(sal_b, patch))  # (B, h/p, w/p)
    r = s.clamp(max=alpha)
    r = r.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2).unsqueeze(1)  # (B, 1, H, W)
    r = r.to(device=x_a.device, dtype=torch.promote_types(x_a.dtype, r.dtype))
    return (r * x_a + (1 - r) * x_b).to(x_a.dtype)


class SPMix:
    """Apply SPMix to each sample of a batch with probability ``prob``; labels stay the tail labels.

    Args:
        alpha: cap on the tail share of each patch (0.8 in the paper).
        patch: patch side in pixels (16).
        prob: per-sample probability of mixing; an unmixed sample is its tail image unchanged.
        saliency_fn: maps images (B, 3, H, W) to saliency (B, 1, H, W) in [0, 1]; used when no
            precomputed maps are passed to ``__call__``.
        mean, std: the per-channel normalisation the input images carry, ``x_in = (x - mean) / std`` (e.g. the
            ImageNet statistics of :func:`~ltcore.data.transforms.normalize_images`); saliency is then computed
            on ``x_in * std + mean``. None (both): the images are used as they are.

    Raises:
        ValueError: if ``alpha`` or ``prob`` is outside ``[0, 1]``, ``patch < 1``, or only one of ``mean`` and
            ``std`` is given, or a ``std`` entry is not positive.
    """

    def __init__(
        self,
        alpha: float = 0.8,
        patch: int = 16,
        prob: float = 0.5,
        saliency_fn: Callable[[torch.Tensor], torch.Tensor] = spectral_residual_saliency,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (the input normalisation) or neither")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.alpha, self.patch, self.prob = float(alpha), int(patch), float(prob)
        self.saliency_fn = saliency_fn
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(v) for v in std)

    def saliency(self, images: torch.Tensor) -> torch.Tensor:
        """``saliency_fn`` of the images before normalisation, ``(B, C, H, W)`` -> ``(B, 1, H, W)``."""
        if self.mean is None or self.std is None:
            return self.saliency_fn(images)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)  # (1, C, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return self.saliency_fn(images * std + mean)

    def __call__(
        self,
        x_tail: torch.Tensor,
        y_tail: torch.Tensor,
        x_head: torch.Tensor,
        generator: torch.Generator,
        sal_tail: torch.Tensor | None = None,
        sal_head: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(images (B, C, H, W), labels (B,))`` with ``labels = y_tail``.

        Args:
            x_tail: class-balanced (tail) images (B, C, H, W).
            y_tail: their labels (B,).
            x_head: instance-sampled (head) images (B, C, H, W).
            generator: draws which samples are mixed (on the generator's device).
            sal_tail, sal_head: optional precomputed saliency (B, 1, H, W); computed with ``saliency_fn``
                when omitted.

        Raises:
            ValueError: on shape mismatch or H, W not divisible by ``patch``.
        """
        if x_tail.ndim != 4 or x_tail.shape != x_head.shape:
            raise ValueError(f"x_tail {tuple(x_tail.shape)} and x_head {tuple(x_head.shape)} must both be (B, C, H, W)")
        if y_tail.shape != (x_tail.shape[0],):
            raise ValueError(f"y_tail must be ({x_tail.shape[0]},) to match x_tail, got {tuple(y_tail.shape)}")
        _check_patch(x_tail.shape[2], x_tail.shape[3], self.patch, "image")
        draw = torch.rand(x_tail.shape[0], generator=generator, device=generator.device)
        mask = (draw < self.prob).to(x_tail.device)  # (B,)
        if not bool(mask.any()):
            return x_tail.clone(), y_tail.clone()
        idx = mask.nonzero().squeeze(1)
        xa, xb = x_tail[idx], x_head[idx]
        sa = self.saliency(xa) if sal_tail is None else sal_tail[idx]
        sb = self.saliency(xb) if sal_head is None else sal_head[idx]
        out = x_tail.clone()
        out[idx] = spmix(xa, xb, sa, sb, alpha=self.alpha, patch=self.patch)
        return out, y_tail.clone()

    def __repr__(self) -> str:
        return f"SPMix(alpha={self.alpha}, patch={self.patch}, prob={self.prob}, mean={self.mean}, std={self.std})"
