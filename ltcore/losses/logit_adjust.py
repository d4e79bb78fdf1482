"""Logit adjustment, "Long-tail learning via logit adjustment", Menon et al., ICLR 2021,
arXiv 2007.07314: the logit-adjusted loss. (The post-hoc correction is the stage-2 calibrator ``posthoc_la`` in
:mod:`ltcore.methods.stage2`.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltcore.losses.ce import _check_inputs
from ltcore.losses.class_balanced import as_class_counts


def _log_prior(class_counts: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """``log pi_j = log(n_j / N)`` as a float tensor (C,)."""
    counts = as_class_counts(class_counts).to(torch.float64)
    return (counts / counts.sum()).log().to(torch.get_default_dtype())


def _check_tau(tau: float) -> float:
    if not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau}")
    return float(tau)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy ``CE(z + tau * log pi)``, ``pi_j = n_j / N``.

    The adjustment is applied in training only; predict with the raw logits.

    Args:
        class_counts: training samples per class (C,).
        tau: adjustment strength (1 in Menon et al.).

    Raises:
        ValueError: on a class with no samples or a non-finite ``tau``.

    Example (identity: tau 0 equals cross-entropy):
        >>> z, y = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([0])
        >>> torch.allclose(LogitAdjustedLoss([5, 3, 1], tau=0.0)(z, y), F.cross_entropy(z, y))
        True
    """

    def __init__(self, class_counts: Sequence[int] | np.ndarray | torch.Tensor, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = _check_tau(tau)
        self.register_buffer("log_prior", _log_prior(class_counts))  # (C,)
        self.log_prior: torch.Tensor

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar mean loss for ``logits (N, C)`` and integer ``target (N,)``."""
        _check_inputs(logits, target, self.log_prior.numel())
        return F.cross_entropy(logits + self.tau * self.log_prior.to(logits.dtype), target)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, num_classes={self.log_prior.numel()}"
