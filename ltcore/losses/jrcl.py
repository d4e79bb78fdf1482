"""JRCL losses, "Joint Representation and Classifier Learning for Long-Tailed Image Classification",
Guan, Li, Zhang, Huang and Zhao (journal article; no arXiv id; code announced at github.com/guanqj932/JRCL).

JRCL trains with ``L = L_cls + L_SCL(one-to-all) + L_BDC``. The paper's formulas are not public; both
losses here are the **interpretation** of METHODS.md section 3:

- Binary Distribution Consistency: ``L_BDC = KL(b_a || b_m)`` between the binary (normal, abnormal)
  distribution ``b_m = [p_normal, sum_{c != normal} p_c]`` of the multi-class softmax and the softmax
  ``b_a`` of an auxiliary 2-way head (option: Jensen-Shannon). The auxiliary head's own CE on
  ``binary_targets(labels, normal_index)`` is the caller's.
- One-to-All SupCon: SupCon with one learnable centre per class as an extra contrast target and a
  class-averaged denominator, as in "Balanced Contrastive Learning for Long-Tailed Visual Recognition",
  Zhu et al., CVPR 2022, arXiv 2207.09052 (BCL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ltcore.losses.supcon import _check_temperature, _flatten_views


def binary_targets(labels: torch.Tensor, normal_index: int) -> torch.Tensor:
    """Normal/abnormal targets (N,) long from class ``labels (N,)``: 0 where ``label == normal_index``, else 1.

    Raises:
        ValueError: if ``labels`` is not a 1-D integer tensor or ``normal_index`` is negative.
    """
    if labels.ndim != 1 or torch.is_floating_point(labels) or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if normal_index < 0:
        raise ValueError(f"normal_index must be >= 0, got {normal_index}")
    return (labels != normal_index).long()


def _binary_log_probs(logits_multi: torch.Tensor, normal_index: int) -> torch.Tensor:
    """``log b_m (N, 2)`` = log [p_normal, sum_{c != normal} p_c], computed in log space."""
    log_p = F.log_softmax(logits_multi, dim=1)  # (N, C)
    log_normal = log_p[:, normal_index]  # (N,)
    others = log_p.clone()
    others[:, normal_index] = float("-inf")
    # logsumexp of the others rather than log(1 - p_normal), which loses all precision as p_normal -> 1.
    return torch.stack([log_normal, torch.logsumexp(others, dim=1)], dim=1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row (N,) from log-probabilities (N, K).

    Both come from log-softmax/logsumexp of finite logits and are finite, so an underflowed ``p = 0``
    contributes ``0 * finite = 0`` with no NaN in the gradient.
    """
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


class BDCLoss(nn.Module):
    """Binary Distribution Consistency loss (**interpretation**, METHODS.md section 3).

    ``b_m = [p_normal, sum_{c != normal} p_c]`` from ``softmax(logits_multi)``, ``b_a = softmax(logits_binary)``
    with column 0 = normal, 1 = abnormal (the order of ``binary_targets``);
    ``L_BDC = mean_i KL(b_a,i || b_m,i)``, or with ``symmetric=True`` the Jensen-Shannon divergence
    ``JS = (KL(b_a || M) + KL(b_m || M)) / 2``, ``M = (b_a + b_m) / 2``. Gradients reach both heads.

    Args:
        normal_index: index of the normal class in the multi-class output (e.g. ``nv`` on HAM10000,
            ``No Finding`` on chest X-ray).
        symmetric: use JS instead of KL.

    Raises:
        ValueError: if ``normal_index`` is out of range, or the logits have the wrong shapes.

    Example (identity: the binary head agrees with the multi-class head, so the loss is 0):
        >>> z = torch.tensor([[0.0, 1.0, 2.0]])  # normal_index 0: b_m = [e^0, e^1 + e^2] / (e^0 + e^1 + e^2)
        >>> zb = torch.tensor([[0.0, math.log(math.e + math.e**2)]])
        >>> bool(BDCLoss(normal_index=0)(z, zb).abs() < 1e-6)
        True
    """

    def __init__(self, normal_index: int, symmetric: bool = False) -> None:
        super().__init__()
        if normal_index < 0:
            raise ValueError(f"normal_index must be >= 0, got {normal_index}")
        self.normal_index = int(normal_index)
        self.symmetric = bool(symmetric)

    def forward(self, logits_multi: torch.Tensor, logits_binary: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for ``logits_multi (N, C)`` and ``logits_binary (N, 2)``."""
        if logits_multi.ndim != 2 or logits_multi.shape[1] < 2:
            raise ValueError(f"logits_multi must have shape (N, C) with C >= 2, got {tuple(logits_multi.shape)}")
        if self.normal_index >= logits_multi.shape[1]:
            raise ValueError(f"normal_index {self.normal_index} is out of range for {logits_multi.shape[1]} classes")
        if logits_binary.shape != (logits_multi.shape[0], 2):
            raise ValueError(
                f"logits_binary must have shape ({logits_multi.shape[0]}, 2), got {tuple(logits_binary.shape)}"
            )
        log_bm = _binary_log_probs(logits_multi, self.normal_index)  # (N, 2)
        log_ba = F.log_softmax(logits_binary, dim=1)  # (N, 2)
        if not self.symmetric:
            return _kl(log_ba, log_bm).mean()
        log_mid = torch.logsumexp(torch.stack([log_ba, log_bm]), dim=0) - math.log(2.0)  # (N, 2)
        return (0.5 * (_kl(log_ba, log_mid) + _kl(log_bm, log_mid))).mean()

    def extra_repr(self) -> str:
        return f"normal_index={self.normal_index}, symmetric={self.symmetric}"


class OneToAllSupConLoss(nn.Module):
    """One-to-All supervised contrastive loss (**interpretation**, METHODS.md section 3; BCL, Zhu et al. 2022).

    Targets of anchor ``z_i`` are the other samples in the batch (all views) and the C learnable class
    centres ``c_k`` (L2-normalised, like the features). With ``B_k`` the targets of class ``k`` (its centre
    included, the anchor excluded), positives ``P(i) = B_{y_i}`` (same-class samples and own centre) and
    ``s_ij = z_i . t_j / tau``:

        l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_k (1/|B_k|) sum_{j in B_k} exp(s_ij) )

    The class-averaged denominator gives every class the same say, however many of its samples are in the
    batch, so head classes do not swamp tail ones. Every anchor has its own centre as a positive, so no
    anchor is dropped. Features are L2-normalised inside ``forward``.

    Args:
        num_classes: C.
        dim: D, the feature dimension.
        temperature: tau > 0 (0.1 in METHODS.md).
        seed: seed of the centres' random initialisation.
        reduction: ``"mean"`` (scalar) or ``"none"`` (per anchor, (N*V,), view-major).

    Raises:
        ValueError: on an invalid argument, features/labels of the wrong shape, or labels outside [0, C).
    """

    def __init__(
        self, num_classes: int, dim: int, temperature: float = 0.1, seed: int = 0, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got num_classes={num_classes}, dim={dim}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.temperature = _check_temperature(temperature)
        self.reduction = reduction
        g = torch.Generator().manual_seed(seed)
        self.centres = nn.Parameter(torch.randn(num_classes, dim, generator=g))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the loss for ``features (N, D)`` or ``(N, V, D)`` and integer ``labels (N,)``."""
        z, y = _flatten_views(features, labels)
        if z.shape[1] != self.dim:
            raise ValueError(f"features have dimension {z.shape[1]} but the loss was built with dim={self.dim}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range [{int(y.min())}, {int(y.max())}]")
        c, m = self.num_classes, z.shape[0]
        z = F.normalize(z, dim=1)  # (M, D)
        targets = torch.cat([z, F.normalize(self.centres, dim=1).to(z)], dim=0)  # (M + C, D)
        target_labels = torch.cat([y, torch.arange(c, device=y.device)])  # (M + C,)
        same = y[:, None] == target_labels[None, :]  # (M, M + C)
        self_mask = torch.zeros_like(same)
        self_mask[:, :m] = torch.eye(m, dtype=torch.bool, device=z.device)
        pos = same & ~self_mask
        # |B_k| for each target column as seen from anchor i: the class count minus the anchor itself.
        class_size = torch.bincount(target_labels, minlength=c)[target_labels]  # (M + C,)
        group_size = (class_size[None, :] - same.long()).to(z.dtype)  # (M, M + C); >= 1 thanks to the centre
        logits = z @ targets.T / self.temperature  # (M, M + C)
        log_den = torch.logsumexp((logits - group_size.log()).masked_fill(self_mask, float("-inf")), dim=1)
        log_prob = logits - log_den[:, None]
        loss = -(log_prob * pos.to(z.dtype)).sum(dim=1) / pos.sum(dim=1).to(z.dtype)  # (M,)
        return loss.mean() if self.reduction == "mean" else loss

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, temperature={self.temperature}"
