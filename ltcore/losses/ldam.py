"""LDAM loss, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss",
Cao et al., NeurIPS 2019, arXiv 1906.07413.

Pair it with ``DeferredReweighting`` for LDAM-DRW: call ``set_weight(drw.weight(epoch))`` at the
start of every epoch, or pass ``weight=`` to ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltcore.losses.ce import _as_class_weight, _check_inputs
from ltcore.losses.class_balanced import as_class_counts


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss ``CE(s * (z - Delta_y * onehot(y)), weight)``.

    Margins ``Delta_j = m / n_j^{1/4}`` with ``m`` chosen so that the largest margin (the rarest
    class) equals ``max_margin``. The reference code applies ``s = 30`` to cosine logits from a
    normalised linear head; with an ordinary linear head a smaller ``s`` may suit better.

    Args:
        class_counts: training samples per class (C,).
        max_margin: largest margin, >= 0 (0.5 in Cao et al.).
        s: logit scale, > 0 (30 in Cao et al.).
        weight: optional per-class weights (C,); replace them per epoch with ``set_weight``.

    Raises:
        ValueError: on a class with no samples, a negative ``max_margin``, ``s <= 0`` or an invalid weight.

    Example (identity: zero margin and s = 1 equal cross-entropy):
        >>> z, y = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([0])
        >>> torch.allclose(LDAMLoss([5, 3, 1], max_margin=0.0, s=1.0)(z, y), F.cross_entropy(z, y))
        True
    """

    def __init__(
        self,
        class_counts: Sequence[int] | np.ndarray | torch.Tensor,
        max_margin: float = 0.5,
        s: float = 30.0,
        weight: torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not max_margin >= 0.0:
            raise ValueError(f"max_margin must be >= 0, got {max_margin}")
        if not s > 0.0:
            raise ValueError(f"s must be > 0, got {s}")
        counts = as_class_counts(class_counts).to(torch.float64)
        margins = counts.pow(-0.25)  # Delta_j proportional to n_j^{-1/4}
        margins = margins * (max_margin / margins.max())
        self.register_buffer("margins", margins.to(torch.get_default_dtype()))  # (C,)
        self.margins: torch.Tensor
        self.s = float(s)
        self.register_buffer("weight", None)
        self.weight: torch.Tensor | None
        self.set_weight(weight)

    def set_weight(self, weight: torch.Tensor | Sequence[float] | None) -> None:
        """Replace the per-class weights (C,) used by later calls; None removes them."""
        w = _as_class_weight(weight)
        if w is not None:
            if w.numel() != self.margins.numel():
                raise ValueError(f"weight has {w.numel()} entries but class_counts has {self.margins.numel()}")
            w = w.to(self.margins.device)
        self.weight = w

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | Sequence[float] | None = None
    ) -> torch.Tensor:
        """Return the scalar mean loss for ``logits (N, C)`` and integer ``target (N,)``.

        ``weight`` (C,), if given, is used for this call instead of the stored weight.
        """
        _check_inputs(logits, target, self.margins.numel())
        w = self.weight if weight is None else _as_class_weight(weight)
        if w is not None:
            if w.numel() != self.margins.numel():
                raise ValueError(f"weight has {w.numel()} entries but class_counts has {self.margins.numel()}")
            w = w.to(device=logits.device, dtype=logits.dtype)
        onehot = F.one_hot(target, num_classes=logits.shape[1]).to(logits.dtype)  # (N, C)
        shifted = logits - onehot * self.margins.to(logits.dtype)  # only the true class loses its margin
        return F.cross_entropy(self.s * shifted, target, weight=w)

    def extra_repr(self) -> str:
        return f"max_margin={float(self.margins.max()):.4g}, s={self.s}, weighted={self.weight is not None}"
