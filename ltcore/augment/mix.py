"""Mixup and CutMix batch augmentations with explicit randomness.

- Mixup: "mixup: Beyond Empirical Risk Minimization" (Zhang et al., arXiv 1710.09412).
  ``lam ~ Beta(alpha, alpha)``, ``x~ = lam x_i + (1 - lam) x_perm(i)``.
- CutMix: "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features"
  (Yun et al., arXiv 1905.04899). A box of area ``(1 - lam) H W`` (centre uniform, clipped to the image)
  from ``x_perm(i)`` is pasted into ``x_i``; ``lam`` is then recomputed from the clipped box.

Both return ``(x_mixed, y_a, y_b, lam)`` and train with
``lam * loss(logits, y_a) + (1 - lam) * loss(logits, y_b)`` (:func:`mix_criterion`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["cutmix", "mix_criterion", "mixup"]


def _draw_lam(alpha: float, generator: torch.Generator) -> float:
    """``lam ~ Beta(alpha, alpha)``; 1.0 (no mixing) when ``alpha == 0``.

    torch's Beta takes no generator, so a numpy generator is seeded from ``generator``: the same torch
    generator state gives the same ``lam``.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (0 disables mixing), got {alpha}")
    if alpha == 0:
        return 1.0
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _check_batch(x: torch.Tensor, y: torch.Tensor, lam: float | None) -> None:
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (B, ...), got {tuple(x.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have {x.shape[0]} rows to match x, got {tuple(y.shape)}")
    if lam is not None and not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")


def _permutation(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def mixup(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    generator: torch.Generator,
    lam: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup a batch with a random permutation of itself.

    Args:
        x: inputs (B, ...), floating.
        y: targets (B,) (or (B, C) soft targets).
        alpha: Beta concentration; 0 disables mixing (lam = 1).
        generator: source of the permutation and of ``lam``.
        lam: optional fixed mixing weight in ``[0, 1]`` instead of a draw.

    Returns:
        ``(x_mixed (B, ...), y_a = y, y_b = y[perm], lam)``.

    Raises:
        ValueError: on ``alpha < 0``, ``lam`` outside ``[0, 1]`` or a batch-size mismatch.
    """
    _check_batch(x, y, lam)
    lam = _draw_lam(alpha, generator) if lam is None else float(lam)
    perm = _permutation(x.shape[0], generator, x.device)
    x_mixed = lam * x + (1.0 - lam) * x[perm]
    return x_mixed, y, y[perm.to(y.device)], lam


def _cut_box(h: int, w: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """Box ``(y0, y1, x0, x1)`` with sides ``sqrt(1 - lam) * (H, W)`` around a uniform centre, clipped."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (1,), generator=generator, device=generator.device).item())
    cx = int(torch.randint(0, w, (1,), generator=generator, device=generator.device).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    return y0, y1, x0, x1


def cutmix(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    generator: torch.Generator,
    lam: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CutMix a batch of images with a random permutation of itself (one box for the whole batch).

    Args:
        x: images (B, C, H, W).
        y: targets (B,).
        alpha: Beta concentration; 0 disables mixing (lam = 1).
        generator: source of the permutation, ``lam`` and the box position.
        lam: optional fixed target weight in ``[0, 1]`` instead of a draw (the returned ``lam`` is still
            the area-corrected one).

    Returns:
        ``(x_mixed, y_a = y, y_b = y[perm], lam)`` where ``1 - lam`` is exactly the fraction of pixels
        taken from ``x[perm]``.

    Raises:
        ValueError: if ``x`` is not (B, C, H, W), on ``alpha < 0``, ``lam`` outside ``[0, 1]`` or a
            batch-size mismatch.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be images (B, C, H, W), got {tuple(x.shape)}")
    _check_batch(x, y, lam)
    lam = _draw_lam(alpha, generator) if lam is None else float(lam)
    perm = _permutation(x.shape[0], generator, x.device)
    h, w = x.shape[-2:]
    y0, y1, x0, x1 = _cut_box(h, w, lam, generator)
    x_mixed = x.clone()
    x_mixed[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    # The box may have been clipped (or rounded), so recompute lam from the pixels actually replaced.
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return x_mixed, y, y[perm.to(y.device)], lam


def mix_criterion(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    y_a: torch.Tensor,
    y_b: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """``lam * loss_fn(logits, y_a) + (1 - lam) * loss_fn(logits, y_b)`` for ``logits (B, C)``."""
    return lam * loss_fn(logits, y_a) + (1.0 - lam) * loss_fn(logits, y_b)
