"""Focal loss, "Focal Loss for Dense Object Detection", Lin et al., ICCV 2017, arXiv 1708.02002.

With class-balanced weights (``class_balanced_weights``) it is the CB-focal loss of Cui et al.
(arXiv 1901.05555).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ltcore.losses.ce import _as_class_weight, _check_inputs


class FocalLoss(nn.Module):
    """Softmax focal loss ``-(1 - p_y)^gamma * log p_y``, averaged over the batch.

    With ``weight`` each sample counts ``w_{y_i}`` times and the mean is weighted,
    ``sum_i w_{y_i} l_i / sum_i w_{y_i}``, the same convention as ``CrossEntropyLoss``, so that
    ``gamma = 0`` equals weighted cross-entropy exactly.

    Args:
        gamma: focusing parameter, >= 0 (2 in Lin et al.).
        weight: optional per-class weights (C,), e.g. class-balanced weights for CB-focal.

    Raises:
        ValueError: if ``gamma`` is negative or ``weight`` is invalid.

    Example (identity: gamma 0 equals cross-entropy):
        >>> z, y = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([0])
        >>> torch.allclose(FocalLoss(gamma=0.0)(z, y), F.cross_entropy(z, y))
        True
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        if not gamma >= 0.0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer("weight", _as_class_weight(weight))
        self.weight: torch.Tensor | None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar mean loss for ``logits (N, C)`` and integer ``target (N,)``."""
        _check_inputs(logits, target, None if self.weight is None else self.weight.numel())
        log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)  # (N,)
        loss = -log_p
        if self.gamma != 0.0:
            # -expm1 is exact for p near 1; the clamp keeps the gradient of (1-p)^gamma finite
            # when gamma < 1 and p rounds to 1.
            one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
            loss = one_minus_p.pow(self.gamma) * loss
        if self.weight is None:
            return loss.mean()
        w = self.weight.to(loss.dtype)[target]  # (N,)
        return (w * loss).sum() / w.sum()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, weighted={self.weight is not None}"
