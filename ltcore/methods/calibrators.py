"""Stage-2 classifier calibrators, the pure-torch parts: cRT, tau-normalisation and LWS.

"Decoupling Representation and Classifier for Long-Tailed Recognition", Kang et al., ICLR 2020,
arXiv 1910.09217. The training loops (class-balanced sampling, epochs) live elsewhere; this module
only builds and transforms classifiers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from ltcore.config import TAU_GRID

#: the tau grid of METHODS.md: 0, 0.1, ..., 2.0 (i / 10 rather than 0.1 * i keeps the keys exact decimals)


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """tau-normalised classifier weights ``w_j / ||w_j||_2^tau``.

    ``tau = 0`` returns the weights unchanged, ``tau = 1`` makes every row unit-norm. The bias is
    not touched: tau-norm classifies with ``x @ w.T`` and no bias, and dropping it is the caller's job.

    Args:
        weight: classifier weight (C, D), one row per class (``nn.Linear.weight``).
        tau: normalisation strength (Kang et al. sweep 0..2).

    Returns:
        a new tensor (C, D); ``weight`` is not modified.

    Raises:
        ValueError: if ``weight`` is not 2-D, ``tau`` is not finite, or a row has zero norm while ``tau != 0``.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must have shape (C, D), got {tuple(weight.shape)}")
    if not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau}")
    if tau == 0:
        return weight.clone()
    norms = weight.norm(p=2, dim=1)  # (C,)
    zero = torch.nonzero(norms == 0)
    if zero.numel():
        raise ValueError(f"weight row {int(zero[0])} has zero norm; tau-normalisation needs every class row non-zero")
    return weight / norms.pow(tau)[:, None]


@torch.no_grad()
def select_tau(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    taus: Sequence[float] = TAU_GRID,
) -> tuple[float, dict[float, float]]:
    """Choose tau for ``tau_normalize`` by balanced accuracy on held-out (validation) features.

    Each candidate classifies with ``argmax(features @ tau_normalize(weight, tau).T)`` (no bias) and
    is scored with ``sklearn.metrics.balanced_accuracy_score`` (mean recall over the classes present in
    ``labels``). Ties go to the smallest tau.

    Args:
        features: frozen-backbone features (N, D) of the validation split.
        labels: integer labels (N,).
        weight: stage-1 classifier weight (C, D).
        taus: candidate values, default ``0, 0.1, ..., 2.0``.

    Returns:
        ``(best_tau, scores)`` with ``scores[tau]`` the balanced accuracy of each candidate.

    Raises:
        ValueError: on empty ``taus`` or ``features``, or mismatched shapes.
    """
    if len(taus) == 0:
        raise ValueError("taus must hold at least one candidate value")
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must have shape (N, D) with N >= 1, got {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have shape ({features.shape[0]},) to match features, got {tuple(labels.shape)}")
    if weight.ndim != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"weight must have shape (C, {features.shape[1]}) to match features, got {tuple(weight.shape)}"
        )
    y_true = labels.detach().cpu().numpy()
    w = weight.detach().to(device=features.device, dtype=features.dtype)
    scores: dict[float, float] = {}
    for tau in taus:
        pred = (features @ tau_normalize(w, float(tau)).T).argmax(dim=1)  # (N,)
        scores[float(tau)] = float(balanced_accuracy_score(y_true, pred.cpu().numpy()))
    best_tau = min(scores, key=lambda t: (-scores[t], t))  # highest score, then smallest tau
    return best_tau, scores


class LWSClassifier(nn.Module):
    """Learnable weight scaling: ``z_j = f_j * (w_j^T x + b_j)``.

    ``W`` and ``b`` are copied from ``linear`` into frozen buffers, so ``parameters()`` yields only
    ``scales`` (C,), initialised to ones (at which the output equals ``linear(x)``). Train with
    class-balanced sampling for a few epochs (Kang et al.).

    Args:
        linear: the stage-1 classifier; it is copied, never modified.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer("weight", linear.weight.detach().clone())  # (C, D)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())  # (C,)
        self.weight: torch.Tensor
        self.bias: torch.Tensor | None
        self.scales = nn.Parameter(
            torch.ones(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled logits (N, C) for features ``x (N, D)``."""
        return F.linear(x, self.weight, self.bias) * self.scales

    def to_linear(self) -> nn.Linear:
        """An ordinary ``nn.Linear`` computing the same function (scales folded into W and b)."""
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=self.weight.dtype
        )
        out = out.to_empty(device=self.weight.device)
        with torch.no_grad():
            out.weight.copy_(self.weight * self.scales[:, None])
            if self.bias is not None:
                out.bias.copy_(self.bias * self.scales)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def reinit_linear(linear: nn.Linear, *, generator: torch.Generator) -> nn.Linear:
    """A fresh ``nn.Linear`` of the same shape, device and dtype, re-initialised for cRT.

    Uses PyTorch's default ``nn.Linear`` initialisation (Kaiming-uniform weight, uniform bias in
    ``+-1/sqrt(D)``) drawn from ``generator`` only, so the global RNG is left alone and the same
    generator state gives the same layer. ``linear`` itself is not modified.

    Args:
        linear: the stage-1 classifier (C, D) whose shape to copy.
        generator: a CPU ``torch.Generator``; the values are drawn on CPU and then moved.
    """
    device, dtype = linear.weight.device, linear.weight.dtype
    # built on "meta" so that construction does not consume the global RNG
    fresh = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", dtype=dtype)
    fresh = fresh.to_empty(device="cpu")
    with torch.no_grad():
        # the same draws as nn.Linear.reset_parameters, but from the given generator
        nn.init.kaiming_uniform_(fresh.weight, a=math.sqrt(5), generator=generator)
        if fresh.bias is not None:
            bound = 1 / math.sqrt(linear.in_features) if linear.in_features > 0 else 0.0
            nn.init.uniform_(fresh.bias, -bound, bound, generator=generator)
    return fresh.to(device)
