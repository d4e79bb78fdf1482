"""Supervised contrastive loss, "Supervised Contrastive Learning", Khosla et al., NeurIPS 2020, arXiv 2004.11362.

This is the ``L^sup_out`` form of the paper (the one its reference code, HobbitLong/SupContrast, implements):
for anchor ``i`` with positives ``P(i)`` (same label, ``i`` itself excluded) and contrast set ``A(i)``
(every other sample in the batch, all views)

    l_i = -(tau / tau_base) / |P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a in A(i)} exp(z_i.z_a / tau) )

This module also holds the small input checks that ``jrcl.py`` reuses for its one-to-all variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _flatten_views(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``features (N*V, D)`` and ``labels (N*V,)`` from ``features (N, D)`` or ``(N, V, D)``.

    Views are laid out view-major (all first views, then all second views), as in the reference code;
    the loss does not depend on the order.

    Raises:
        ValueError: if ``features`` is not 2-D/3-D floating point or ``labels`` is not an integer (N,) tensor.
    """
    if not torch.is_floating_point(features):
        raise ValueError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    if features.ndim not in (2, 3):
        raise ValueError(f"features must have shape (N, D) or (N, V, D), got {tuple(features.shape)}")
    n = features.shape[0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match features, got {tuple(labels.shape)}")
    if torch.is_floating_point(labels) or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if features.ndim == 2:
        return features, labels
    v = features.shape[1]
    return torch.cat(torch.unbind(features, dim=1), dim=0), labels.repeat(v)


def _check_temperature(temperature: float, name: str = "temperature") -> float:
    if not temperature > 0.0:
        raise ValueError(f"{name} must be > 0, got {temperature}")
    return float(temperature)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (``L^sup_out``) over one batch.

    ``l_i = -(tau / tau_base) * mean_{p in P(i)} log softmax_{a != i}(z_i . z_a / tau)_p``; the result is the
    mean of ``l_i`` over the anchors that have at least one positive. Anchors whose label occurs only once
    in the batch (all views counted) have no positive and are **excluded from the mean** (the reference
    code would divide by zero there); if no anchor has a positive the loss is 0 (still attached to the graph).

    Features are L2-normalised inside ``forward`` (idempotent for inputs that already are), so the
    similarity is the cosine similarity, the same as ``pytorch_metric_learning.losses.SupConLoss``.
    That implementation also drops anchors without positives from its mean (``AvgNonZeroReducer``) and
    agrees with this one to float precision; the one difference is a batch with no negative pair at all
    (a single label), where it returns 0 while this loss still computes the formula above.

    Args:
        temperature: ``tau`` > 0 (0.1 in the paper's ImageNet runs and in METHODS.md section 2).
        base_temperature: ``tau_base``; the loss is scaled by ``tau / tau_base``. None means
            ``tau_base = tau`` (scale 1). The reference code uses 0.07.

    Raises:
        ValueError: on a non-positive temperature, or features/labels of the wrong shape or dtype.

    Example (identity: two orthogonal classes of two identical points each, tau = 1):
        >>> z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> # each anchor: -log(e^1 / (e^1 + 2 e^0))
        >>> expected = -torch.log(torch.tensor(torch.e / (torch.e + 2.0)))
        >>> torch.allclose(SupConLoss(temperature=1.0)(z, y), expected)
        True
    """

    def __init__(self, temperature: float = 0.1, base_temperature: float | None = None) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.base_temperature = (
            self.temperature if base_temperature is None else _check_temperature(base_temperature, "base_temperature")
        )

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for ``features (N, D)`` or ``(N, V, D)`` and integer ``labels (N,)``."""
        z, y = _flatten_views(features, labels)
        m = z.shape[0]
        z = F.normalize(z, dim=1)  # (M, D)
        self_mask = torch.eye(m, dtype=torch.bool, device=z.device)  # (M, M)
        pos = (y[:, None] == y[None, :]) & ~self_mask  # (M, M)
        n_pos = pos.sum(dim=1)  # (M,)
        has_pos = n_pos > 0
        if not bool(has_pos.any()):
            # Keeps the graph connected (DDP expects every parameter to receive a gradient).
            return features.sum() * 0.0
        sim = (z @ z.T / self.temperature).masked_fill(self_mask, float("-inf"))  # (M, M)
        log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)  # (M, M); -inf on the diagonal
        mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(dim=1)[has_pos] / n_pos[has_pos]
        return -(self.temperature / self.base_temperature) * mean_log_prob_pos.mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, base_temperature={self.base_temperature}"
