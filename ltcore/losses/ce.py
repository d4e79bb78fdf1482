"""Cross-entropy with optional label smoothing and per-class weights.

The plain baseline every long-tail method is compared with. Label smoothing follows
"Rethinking the Inception Architecture for Computer Vision" (Szegedy et al., arXiv 1512.00567).

This module also holds the small input checks the other loss modules share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _as_class_weight(weight: torch.Tensor | Sequence[float] | None) -> torch.Tensor | None:
    """Return ``weight`` as a float tensor (C,) after checking it, or None.

    Raises:
        ValueError: if the weight is not 1-D, empty, or has a negative or non-finite entry.
    """
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.get_default_dtype()).detach().clone()
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError(f"weight must be a non-empty 1-D sequence of per-class weights, got shape {tuple(w.shape)}")
    bad = (~torch.isfinite(w)) | (w < 0)
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0])
        raise ValueError(f"weight[{j}] = {w[j].item()}: every per-class weight must be finite and >= 0")
    return w


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> None:
    """Check ``logits (N, C)`` and ``target (N,)`` agree with each other and with ``num_classes``.

    Raises:
        ValueError: on a shape mismatch, naming the offending argument.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must have shape ({logits.shape[0]},) to match logits, got {tuple(target.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"logits have {logits.shape[1]} classes but the loss was built for {num_classes}; "
            "pass class_counts/weight with one entry per class"
        )


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy ``-log softmax(z)_y``, averaged over the batch.

    With ``weight`` the mean is weighted, ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (PyTorch's
    convention, also used by the LDAM-DRW reference code), so uniform weights change nothing.

    Args:
        label_smoothing: mass in ``[0, 1)`` spread uniformly over all classes.
        weight: optional per-class weights (C,), e.g. class-balanced weights for CB-CE.

    Raises:
        ValueError: if ``label_smoothing`` is outside ``[0, 1)`` or ``weight`` is invalid.

    Example:
        >>> loss = CrossEntropyLoss()
        >>> round(loss(torch.zeros(1, 4), torch.tensor([2])).item(), 4)  # log 4
        1.3863
    """

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", _as_class_weight(weight))
        self.weight: torch.Tensor | None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar mean loss for ``logits (N, C)`` and integer ``target (N,)``."""
        _check_inputs(logits, target, None if self.weight is None else self.weight.numel())
        weight = None if self.weight is None else self.weight.to(logits.dtype)
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, weighted={self.weight is not None}"
