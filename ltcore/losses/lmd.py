"""LMD: relation-aware representation learning and iterative classifier calibration.

"Long-tailed Medical Diagnosis with Relation-aware Representation Learning and Iterative Classifier
Calibration" (Pan et al., arXiv 2502.03238).

Stage 1 (RRL) trains a student with ``CE + [epoch > 20] * (5 L_prob + 10 L_batch + 10 L_chan)`` against an
EMA teacher (``alpha_t = min(1 - 1/(t+1), 0.999)``), where for logits ``z`` and the batch of backbone
features ``A (B, D)`` (primes mark the teacher)::

    L_prob  = KL(softmax(z') || softmax(z)), averaged over the batch
    L_batch = sum((S - S')^2) / B,  S = rownorm(A A^T)   (B, B)
    L_chan  = sum((G - G')^2) / B,  G = rownorm(A^T A)   (D, D)

(we divide ``L_chan`` by ``D / 4`` instead of B by default, see :class:`RelationDistillationLoss`).

Stage 2 (ICC) alternates an M-step (a fresh linear classifier trained on virtual features sampled from one
Gaussian per class, mean and unbiased covariance + 0.01 I) and an E-step (backbone fine-tuned with the
generalised CE ``(1 - p_y^q)/q``, q = 0.7, plus ``1e-4 * L_FDC`` computed from EMA-smoothed class
statistics, decay 0.999).

**Interpretation** (METHODS.md section 4): in the public code the FDC term pulls features toward the *other*
classes (its helper, documented as returning ``exp`` of the Mahalanobis distance, returns the raw squared
distance ``M``, so ``mean M_other - mean M_own`` is minimised by moving toward other classes), and the GCE
term is computed from classifier outputs taken under ``torch.no_grad``, so it sends no gradient to the
backbone. We ship the corrected reading ``L_FDC = mean_i [M_iy/2 + logsumexp_c(-M_ic/2)]`` (the cross-entropy
of the equal-prior Gaussian class posterior, in log space so that it does not underflow at realistic feature
dimensions), which pulls a feature toward its own class Gaussian and pushes it away from the others, and GCE
with gradients.

This module holds the losses. The EMA teacher and the relation terms' switch are the stage-1 recipe's
(:mod:`ltcore.methods.lmd_rrl`); the class Gaussians and the ICC rounds are stage 2's (:mod:`ltcore.methods.icc`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltcore.losses.ce import _check_inputs

__all__ = ["CHAN_NORMS", "FDCLoss", "GeneralizedCELoss", "RelationDistillationLoss"]


def _row_normalised_gram(a: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``rownorm(A A^T)`` (B, B) for ``transpose=False`` or ``rownorm(A^T A)`` (D, D) for ``transpose=True``."""
    gram = a.t() @ a if transpose else a @ a.t()
    # F.normalize clamps the norm at eps, so an all-zero row gives zeros instead of NaN.
    return F.normalize(gram, p=2, dim=1)


CHAN_NORMS = ("dim", "batch")


class RelationDistillationLoss(nn.Module):
    """Relation-aware distillation from an EMA teacher: ``w_prob L_prob + w_batch L_batch + w_chan L_chan``.

    For logits ``z (B, C)`` and backbone features ``A (B, D)`` (primes mark the teacher, whose inputs are
    detached): ``L_prob = KL(softmax(z') || softmax(z))`` (batch mean); ``L_batch = sum((S - S')^2) / B`` with
    ``S = rownorm(A A^T)`` (B, B); ``L_chan = sum((G - G')^2) / n`` with ``G = rownorm(A^T A)`` (D, D). The CE
    term and the ``[epoch > 20]`` switch (:func:`ltcore.methods.lmd_rrl.active`) are the caller's.

    **Interpretation** (METHODS.md section 4): the public code divides the channel term by ``n = B``, but
    ``sum((G - G')^2)`` grows with D, so the term's weight relative to the others scales with ``D / B``. The
    public weights were set for ResNet-18 (D = 512) at B = 128; with EfficientNet-Lite0 (D = 1280) at B = 64 the
    same weight is 5x stronger. ``chan_norm="dim"`` (default) divides by ``n = D / 4`` instead, identical at the
    public setting (512 / 4 = 128) and independent of the batch size; ``chan_norm="batch"`` is the public form.

    Args:
        w_prob: weight of the prediction-consistency term (5 in the paper).
        w_batch: weight of the sample-relation term (10).
        w_chan: weight of the channel-relation term (10).
        chan_norm: ``"dim"`` (divide ``L_chan`` by D / 4) or ``"batch"`` (by B, the public code).

    Raises:
        ValueError: on a negative weight or an unknown ``chan_norm``, or in ``forward`` on mismatched shapes.

    Example:
        >>> loss = RelationDistillationLoss()
        >>> z, a = torch.randn(4, 3), torch.randn(4, 8)
        >>> loss(z, z, a, a)["total"].item()  # teacher == student
        0.0
    """

    def __init__(self, w_prob: float = 5.0, w_batch: float = 10.0, w_chan: float = 10.0,
                 chan_norm: str = "dim") -> None:
        super().__init__()
        for name, w in (("w_prob", w_prob), ("w_batch", w_batch), ("w_chan", w_chan)):
            if w < 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        if chan_norm not in CHAN_NORMS:
            raise ValueError(f"chan_norm {chan_norm!r} is not valid; choose one of {', '.join(CHAN_NORMS)}")
        self.w_prob, self.w_batch, self.w_chan = float(w_prob), float(w_batch), float(w_chan)
        self.chan_norm = chan_norm

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_feats: torch.Tensor,
        teacher_feats: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Return ``dict(prob=, batch=, chan=, total=)`` of scalar tensors (``total`` is weighted).

        Args:
            student_logits: (B, C).
            teacher_logits: (B, C), detached here.
            student_feats: backbone features (B, D); extra trailing dims are flattened.
            teacher_feats: (B, D), detached here.
        """
        if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
                "must both be (B, C)"
            )
        a_s, a_t = student_feats.flatten(1), teacher_feats.detach().flatten(1)  # (B, D)
        if a_s.shape != a_t.shape or a_s.shape[0] != student_logits.shape[0]:
            raise ValueError(
                f"student_feats {tuple(student_feats.shape)} and teacher_feats {tuple(teacher_feats.shape)} must "
                f"both be (B, D) with B = {student_logits.shape[0]} as in the logits"
            )
        b, d = a_s.shape
        log_p_s = F.log_softmax(student_logits, dim=1)
        log_p_t = F.log_softmax(teacher_logits.detach(), dim=1)
        prob = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        batch = (_row_normalised_gram(a_s, False) - _row_normalised_gram(a_t, False)).pow(2).sum() / b
        chan_sq = (_row_normalised_gram(a_s, True) - _row_normalised_gram(a_t, True)).pow(2).sum()
        chan = chan_sq / (d / 4.0 if self.chan_norm == "dim" else b)
        total = self.w_prob * prob + self.w_batch * batch + self.w_chan * chan
        return {"prob": prob, "batch": batch, "chan": chan, "total": total}

    def extra_repr(self) -> str:
        return f"w_prob={self.w_prob}, w_batch={self.w_batch}, w_chan={self.w_chan}, chan_norm={self.chan_norm!r}"


class GeneralizedCELoss(nn.Module):
    """Generalised cross-entropy (Zhang & Sabuncu, NeurIPS 2018): ``(1 - p_y^q) / q``, batch mean.

    Computed as ``-expm1(q log p_y) / q`` so small ``q`` stays accurate; ``q -> 0`` gives CE, ``q = 1`` MAE
    (up to a factor). Gradients flow (the public LMD code evaluated it under no-grad; see module docstring).

    Args:
        q: exponent in ``(0, 1]``; 0.7 in LMD's E-step.

    Raises:
        ValueError: if ``q`` is outside ``(0, 1]``, or in ``forward`` on mismatched shapes.

    Example:
        >>> round(GeneralizedCELoss(q=1.0)(torch.zeros(1, 2), torch.tensor([0])).item(), 4)  # 1 - 1/2
        0.5
    """

    def __init__(self, q: float = 0.7) -> None:
        super().__init__()
        if not 0.0 < q <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {q}")
        self.q = float(q)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar mean loss for ``logits (N, C)`` and integer ``target (N,)``."""
        _check_inputs(logits, target)
        log_p_y = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)  # (N,)
        return (-torch.expm1(self.q * log_p_y) / self.q).mean()

    def extra_repr(self) -> str:
        return f"q={self.q}"


class FDCLoss(nn.Module):
    """Feature-distribution calibration: ``L_FDC = mean_i [ M_iy/2 + logsumexp_c(-M_ic/2) ]``.

    ``M[i, c] = (f_i - mu_c)^T Sigma_c^{-1} (f_i - mu_c)`` is the squared Mahalanobis distance of feature i
    (B, D) to class c's Gaussian. The loss is the cross-entropy of the equal-prior Gaussian class posterior
    ``softmax_c(-M_ic/2)`` at the true class, computed in log space: minimising it pulls each feature toward
    its own class Gaussian and away from the others. The class statistics are treated as constants (detached);
    precisions come from one Cholesky factorisation per call.

    **Interpretation** (METHODS.md section 4): the public LMD code's FDC pulled features toward the *other*
    classes (it used the raw distance M where ``exp(-M/2)`` was meant) and computed the GCE term under
    no-grad. A direct fix, ``mean exp(-M_other/2) - mean exp(-M_own/2)``, is numerically zero, loss and
    gradient, for feature dimensions above ~64 (M grows with D, and ``exp(-M/2)`` underflows); the log-space
    form here has the same optimum and stays finite and informative at D = 1280. The log-determinants of the
    covariances are left out, as in the public code's distance. LMD weights it by 1e-4 next to
    :class:`GeneralizedCELoss`; the weight is the caller's.

    Raises:
        ValueError: in ``forward`` on mismatched shapes, fewer than 2 classes, or labels out of range.

    Example (a feature on its own mean, far from the other class: loss ~ 0, its infimum):
        >>> means, covs = torch.tensor([[0.0, 0.0], [100.0, 0.0]]), torch.eye(2).repeat(2, 1, 1)
        >>> FDCLoss()(torch.zeros(1, 2), torch.tensor([0]), means, covs).item()
        0.0
    """

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, covs: torch.Tensor
    ) -> torch.Tensor:
        """Return the scalar loss.

        Args:
            features: (B, D).
            labels: (B,) integer classes.
            means: class means (C, D), e.g. ``ltcore.methods.icc.ClassGaussians.means``.
            covs: class covariances (C, D, D), positive definite.
        """
        if features.ndim != 2:
            raise ValueError(f"features must be (B, D), got {tuple(features.shape)}")
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must be ({features.shape[0]},) to match features, got {tuple(labels.shape)}")
        c, d = means.shape[0], features.shape[1]
        if means.shape != (c, d) or covs.shape != (c, d, d):
            raise ValueError(
                f"means must be (C, {d}) and covs (C, {d}, {d}); got {tuple(means.shape)}, {tuple(covs.shape)}"
            )
        if c < 2:
            raise ValueError(f"FDC needs at least 2 classes, got {c}")
        labels = labels.long()
        if int(labels.min()) < 0 or int(labels.max()) >= c:
            raise ValueError(f"labels must lie in [0, {c}), got range [{int(labels.min())}, {int(labels.max())}]")
        dtype = torch.promote_types(features.dtype, torch.float32)
        f = features.to(dtype)
        mu, cov = means.detach().to(f), covs.detach().to(f)
        chol = torch.linalg.cholesky(cov)  # (C, D, D), cov = L L^T
        diff = (f.unsqueeze(0) - mu.unsqueeze(1)).transpose(1, 2)  # (C, D, B)
        # M = diff^T cov^-1 diff = ||L^-1 diff||^2
        sol = torch.linalg.solve_triangular(chol, diff, upper=False)  # (C, D, B)
        maha = sol.pow(2).sum(1).t()  # (B, C)
        # -log softmax_y(-M/2) = M_y/2 + logsumexp_c(-M_c/2): no exp of -M/2 on its own, so no underflow
        return F.cross_entropy(-0.5 * maha, labels)
