"""Class-balanced weights from the effective number of samples, and deferred re-weighting.

- "Class-Balanced Loss Based on Effective Number of Samples", Cui et al., CVPR 2019,
  arXiv 1901.05555: ``w_j = (1 - beta) / (1 - beta^{n_j})``, normalised so ``sum_j w_j = C``.
- Deferred re-weighting (DRW) from "Learning Imbalanced Datasets with Label-Distribution-Aware
  Margin Loss", Cao et al., NeurIPS 2019, arXiv 1906.07413: no class weights before epoch
  ``T0``, class-balanced weights from ``T0`` on.

``as_class_counts`` is the one place class counts are validated; every count-based loss uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def as_class_counts(class_counts: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate per-class training counts and return them as a long tensor (C,).

    Raises:
        ValueError: if the counts are empty, not 1-D, not whole numbers, or any class has
            fewer than one training sample (the message names the class index).
    """
    if isinstance(class_counts, torch.Tensor):
        class_counts = class_counts.detach().cpu().numpy()
    arr = np.asarray(class_counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence of ints, got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"class_counts must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not bool(np.all(np.isfinite(arr) & (arr == np.round(arr)))):
        j = int(np.flatnonzero(~(np.isfinite(arr) & (arr == np.round(arr))))[0])
        raise ValueError(f"class_counts[{j}] = {arr[j]} is not a whole number; pass integer sample counts")
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"class_counts[{j}] = {arr[j]}: every class needs >= 1 training sample; "
            "drop the class or add samples for it"
        )
    return torch.as_tensor(arr.astype(np.int64))


def class_balanced_weights(
    class_counts: Sequence[int] | np.ndarray | torch.Tensor, beta: float = 0.9999
) -> torch.Tensor:
    """Class-balanced weights (Cui et al.) for ``class_counts`` (C,), returned as a float tensor (C,).

    ``w_j = (1 - beta) / (1 - beta^{n_j})``, i.e. the inverse effective number of samples, then
    rescaled so ``sum_j w_j = C``. ``beta = 0`` gives all ones; ``beta -> 1`` tends to inverse frequency.

    Raises:
        ValueError: if ``beta`` is outside ``[0, 1)`` or the counts are invalid (see ``as_class_counts``).

    Example:
        >>> class_balanced_weights([10, 10, 10]).tolist()
        [1.0, 1.0, 1.0]
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = as_class_counts(class_counts).to(torch.float64)
    if beta == 0.0:
        w = torch.ones_like(n)
    else:
        # 1 - beta^n computed as -expm1(n log beta): beta = 0.9999 would lose digits in float arithmetic.
        w = (1.0 - beta) / -torch.expm1(n * math.log(beta))
    w = w * (n.numel() / w.sum())
    return w.to(torch.get_default_dtype())


class DeferredReweighting:
    """DRW schedule: ``weight(epoch)`` is None before ``start_epoch`` and CB weights (C,) from it on.

    Epochs count from 0. LDAM-DRW uses ``start_epoch = int(0.8 * epochs)`` (160 of 200 on CIFAR in
    Cao et al.); pass the returned weight to the loss every epoch (e.g. ``LDAMLoss.set_weight``).

    Args:
        class_counts: training samples per class (C,).
        start_epoch: first (0-based) epoch that uses class-balanced weights.
        beta: class-balanced ``beta`` (see ``class_balanced_weights``).

    Raises:
        ValueError: if ``start_epoch`` is negative, ``beta`` is outside ``[0, 1)``, or the counts are invalid.
    """

    def __init__(
        self, class_counts: Sequence[int] | np.ndarray | torch.Tensor, start_epoch: int, beta: float = 0.9999
    ) -> None:
        if int(start_epoch) != start_epoch or start_epoch < 0:
            raise ValueError(f"start_epoch must be an integer >= 0, got {start_epoch}")
        self.start_epoch = int(start_epoch)
        self.beta = float(beta)
        self._weights = class_balanced_weights(class_counts, beta=beta)

    def weight(self, epoch: int) -> torch.Tensor | None:
        """Per-class weights (C,) to use in 0-based ``epoch``, or None (unweighted) before ``start_epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch < self.start_epoch:
            return None
        return self._weights.clone()

    def __repr__(self) -> str:
        c = self._weights.numel()
        return f"DeferredReweighting(start_epoch={self.start_epoch}, beta={self.beta}, num_classes={c})"
