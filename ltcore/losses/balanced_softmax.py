"""Balanced Softmax, "Balanced Meta-Softmax for Long-Tailed Visual Recognition", Ren et al.,
NeurIPS 2020, arXiv 2007.10740.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltcore.losses.ce import _check_inputs
from ltcore.losses.class_balanced import as_class_counts


class BalancedSoftmaxLoss(nn.Module):
    """Balanced Softmax ``CE(z + log n)``, ``n`` the training counts per class.

    Adding ``log n_j`` to logit ``j`` during training only; predict with the raw logits. Using
    ``log n`` rather than ``log pi`` changes nothing, softmax being shift-invariant.

    Args:
        class_counts: training samples per class (C,).

    Raises:
        ValueError: on a class with no samples.

    Example (identity: uniform counts equal cross-entropy):
        >>> z, y = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([0])
        >>> torch.allclose(BalancedSoftmaxLoss([4, 4, 4])(z, y), F.cross_entropy(z, y))
        True
    """

    def __init__(self, class_counts: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        super().__init__()
        counts = as_class_counts(class_counts).to(torch.float64)
        self.register_buffer("log_counts", counts.log().to(torch.get_default_dtype()))  # (C,)
        self.log_counts: torch.Tensor

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar mean loss for ``logits (N, C)`` and integer ``target (N,)``."""
        _check_inputs(logits, target, self.log_counts.numel())
        return F.cross_entropy(logits + self.log_counts.to(logits.dtype), target)

    def extra_repr(self) -> str:
        return f"num_classes={self.log_counts.numel()}"
