"""Triplet losses for metric learning in stage 1 (METHODS.md section 2, Zeng et al., arXiv 2207.06975).

- Batch-hard triplet loss: "In Defense of the Triplet Loss for Person Re-Identification",
  Hermans, Beyer and Leibe, arXiv 1703.07737.
- Class-centre triplet loss: **interpretation** (METHODS.md section 2): each anchor against the centre of
  its own class in the batch and the nearest centre of another class in the batch.

Both use the Euclidean (not squared) distance between L2-normalised embeddings, as METHODS.md asks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltcore.losses.supcon import _flatten_views


def _check_margin(margin: float) -> float:
    if not margin >= 0.0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return float(margin)


def _euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances (A, B) between ``a (A, D)`` and ``b (B, D)``, with a finite gradient at 0."""
    d2 = (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min(0.0)  # (A, B)
    zero = d2 == 0.0
    # sqrt has an infinite derivative at 0; shift exact zeros before the root and put them back after.
    return torch.sqrt(d2 + zero.to(d2.dtype) * 1e-16) * (~zero).to(d2.dtype)


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017, "Batch Hard").

    ``l_i = relu(max_{p: y_p = y_i, p != i} d(x_i, x_p) - min_{n: y_n != y_i} d(x_i, x_n) + margin)``,
    averaged over the anchors that have at least one positive and one negative in the batch (0, still
    attached to the graph, if none has). ``d`` is the Euclidean distance; embeddings are L2-normalised
    first unless ``normalize=False``.

    Args:
        margin: the margin, >= 0 (0.2 in METHODS.md section 2).
        normalize: L2-normalise the embeddings inside ``forward`` (default True, METHODS.md).

    Raises:
        ValueError: on a negative margin, or embeddings/labels of the wrong shape or dtype.
    """

    def __init__(self, margin: float = 0.2, normalize: bool = True) -> None:
        super().__init__()
        self.margin = _check_margin(margin)
        self.normalize = bool(normalize)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for ``embeddings (N, D)`` (or ``(N, V, D)``) and integer ``labels (N,)``."""
        x, y = _flatten_views(embeddings, labels)
        if self.normalize:
            x = F.normalize(x, dim=1)
        m = x.shape[0]
        d = _euclidean(x, x)  # (M, M)
        same = y[:, None] == y[None, :]  # (M, M)
        pos = same & ~torch.eye(m, dtype=torch.bool, device=x.device)
        neg = ~same
        valid = pos.any(dim=1) & neg.any(dim=1)  # (M,)
        if not bool(valid.any()):
            return embeddings.sum() * 0.0
        hardest_pos = d.masked_fill(~pos, float("-inf")).amax(dim=1)  # (M,)
        hardest_neg = d.masked_fill(~neg, float("inf")).amin(dim=1)  # (M,)
        return F.relu(hardest_pos - hardest_neg + self.margin)[valid].mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize={self.normalize}"


class ClassCentreTripletLoss(nn.Module):
    """Class-centre triplet loss (**interpretation**, METHODS.md section 2).

    With ``c_k`` the mean of the batch embeddings of class ``k`` (the anchor included; centres are not
    re-normalised, and gradients flow through them),
    ``l_i = relu(d(x_i, c_{y_i}) - min_{k != y_i} d(x_i, c_k) + margin)``, averaged over every anchor whose
    batch holds at least one other class (0, still attached to the graph, if the batch has one class).
    ``d`` is the Euclidean distance; embeddings are L2-normalised first unless ``normalize=False``.

    Args:
        margin: the margin, >= 0 (0.2 in METHODS.md section 2).
        normalize: L2-normalise the embeddings inside ``forward`` (default True, METHODS.md).

    Raises:
        ValueError: on a negative margin, or embeddings/labels of the wrong shape or dtype.
    """

    def __init__(self, margin: float = 0.2, normalize: bool = True) -> None:
        super().__init__()
        self.margin = _check_margin(margin)
        self.normalize = bool(normalize)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for ``embeddings (N, D)`` (or ``(N, V, D)``) and integer ``labels (N,)``."""
        x, y = _flatten_views(embeddings, labels)
        if self.normalize:
            x = F.normalize(x, dim=1)
        classes, inverse = torch.unique(y, return_inverse=True)  # (K,), (M,)
        k = classes.shape[0]
        if k < 2:
            return embeddings.sum() * 0.0
        one_hot = F.one_hot(inverse, k).to(x.dtype)  # (M, K)
        centres = (one_hot.T @ x) / one_hot.sum(0)[:, None]  # (K, D)
        d = _euclidean(x, centres)  # (M, K)
        own = one_hot.bool()
        d_own = d[own]  # (M,): exactly one own centre per row
        d_other = d.masked_fill(own, float("inf")).amin(dim=1)  # (M,)
        return F.relu(d_own - d_other + self.margin).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize={self.normalize}"
