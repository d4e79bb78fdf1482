"""Classifier heads and the contrastive projection head.

Every head maps features ``(B, D)``; the classifiers keep their class weights in ``.weight`` ``(C, D)`` so that
stage-2 calibrators (tau-norm, LWS, cRT) can read and rescale them the same way for either head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Linear):
    """``logits = x W^T + b``: features ``(B, D)`` -> logits ``(B, C)``; ``weight`` ``(C, D)``, ``bias`` ``(C,)``."""

    def __init__(self, in_dim: int, num_classes: int, bias: bool = True) -> None:
        if in_dim < 1 or num_classes < 1:
            raise ValueError(f"LinearHead needs in_dim >= 1 and num_classes >= 1, got {in_dim}, {num_classes}")
        super().__init__(in_dim, num_classes, bias=bias)
        self.in_dim = in_dim
        self.num_classes = num_classes


class CosineHead(nn.Module):
    """Cosine classifier: ``logits_c = scale * cos(x, w_c) = scale * <x/|x|, w_c/|w_c|>``.

    Features ``(B, D)`` -> logits ``(B, C)``; ``weight`` ``(C, D)``; no bias. ``scale`` sets how peaked the
    softmax can get, since cosines lie in [-1, 1].
    """

    def __init__(self, in_dim: int, num_classes: int, scale: float = 16.0, eps: float = 1e-12) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ValueError(f"CosineHead needs in_dim >= 1 and num_classes >= 1, got {in_dim}, {num_classes}")
        if scale <= 0:
            raise ValueError(f"CosineHead scale must be > 0, got {scale}")
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.scale = float(scale)
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # same init as nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1, eps=self.eps)  # (B, D)
        w = F.normalize(self.weight, dim=1, eps=self.eps)  # (C, D)
        return self.scale * (x @ w.t())  # (B, C)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_classes={self.num_classes}, scale={self.scale}"


class ProjectionMLP(nn.Module):
    """``z = normalize(W2 relu(W1 x + b1) + b2)``: features ``(B, D)`` -> unit-norm embeddings ``(B, P)``.

    The two-layer MLP of SupCon (Khosla et al., arXiv 2004.11362) used by the contrastive and metric-learning
    methods; no batch norm, so it works for any batch size including 1.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(f"ProjectionMLP dims must be >= 1, got in={in_dim} hidden={hidden_dim} out={out_dim}")
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.out_dim = out_dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1, eps=self.eps)  # (B, P), unit L2 norm
