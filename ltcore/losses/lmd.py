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
In the public code the class statistics are smoothed once per ICC round with decay
``min(1 - 1/(r+1), 0.999)`` at round r, i.e. ``ClassGaussians.ema_update_(..., decay=ema_alpha(r))``.

This module holds the losses, the EMA helpers and the class-Gaussian statistics; the training loop (when to
switch the relation terms on, gathering features across workers, the ICC rounds) belongs to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ltcore.losses.ce import _check_inputs

__all__ = [
    "CHAN_NORMS",
    "ClassGaussians",
    "FDCLoss",
    "GeneralizedCELoss",
    "RelationDistillationLoss",
    "active",
    "ema_alpha",
    "ema_update_",
]


def ema_alpha(step: int) -> float:
    """Teacher EMA decay at optimiser step ``step`` (0-based): ``min(1 - 1/(step+1), 0.999)``.

    Step 0 gives 0 (the teacher becomes a copy of the student); the decay then ramps up and is capped at
    0.999, as in the public mean-teacher code.

    Raises:
        ValueError: if ``step`` is negative.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(1.0 - 1.0 / (step + 1), 0.999)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """In place: ``teacher <- alpha * teacher + (1 - alpha) * student`` for parameters and float buffers.

    Non-float buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied from the student.

    Raises:
        ValueError: if ``alpha`` is outside ``[0, 1]`` or the two modules do not have the same
            parameter/buffer names and shapes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for kind, t_items, s_items in (
        ("parameter", teacher.named_parameters(), student.named_parameters()),
        ("buffer", teacher.named_buffers(), student.named_buffers()),
    ):
        t_dict, s_dict = dict(t_items), dict(s_items)
        if t_dict.keys() != s_dict.keys():
            diff = sorted(set(t_dict) ^ set(s_dict))
            raise ValueError(f"teacher and student differ in {kind} names (e.g. {diff[:3]}); use the same architecture")
        for name, t in t_dict.items():
            s = s_dict[name]
            if t.shape != s.shape:
                raise ValueError(f"{kind} {name!r}: teacher shape {tuple(t.shape)} != student {tuple(s.shape)}")
            if t.is_floating_point():
                t.mul_(alpha).add_(s.detach().to(t.dtype), alpha=1.0 - alpha)
            else:
                t.copy_(s)


def active(epoch: int, start_epoch: int = 20) -> bool:
    """Whether the relation terms are on: ``epoch > start_epoch`` (the paper's ``[epoch > 20]``).

    ``epoch`` is counted the way the caller counts it (the public code's loop is 0-based).
    """
    return epoch > start_epoch


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
    term and the ``[epoch > 20]`` switch (see :func:`active`) are the caller's.

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


class ClassGaussians(nn.Module):
    """One Gaussian per class over backbone features: ``means (C, D)``, ``covs (C, D, D)`` as buffers.

    :meth:`fit` estimates ``mean_c`` and the unbiased covariance ``sum (x - mean_c)(x - mean_c)^T / (n_c - 1)``
    plus ``shrinkage * I``. A class with a single sample has no spread to estimate, so its covariance is
    ``shrinkage * I`` alone. :meth:`sample` draws virtual features for the ICC M-step; :meth:`ema_update_`
    keeps the smoothed statistics used by :class:`FDCLoss`.

    Args:
        means: (C, D).
        covs: (C, D, D), symmetric positive definite.
        counts: optional samples per class (C,), kept for reference (0 marks a class absent from the fit).

    Raises:
        ValueError: if the shapes disagree.
    """

    means: torch.Tensor
    covs: torch.Tensor
    counts: torch.Tensor

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        super().__init__()
        if means.ndim != 2 or covs.shape != (*means.shape, means.shape[1]):
            raise ValueError(
                f"means must be (C, D) and covs (C, D, D); got means {tuple(means.shape)}, covs {tuple(covs.shape)}"
            )
        if counts is None:
            counts = torch.full((means.shape[0],), -1, dtype=torch.long)
        self.register_buffer("means", means.detach().clone())
        self.register_buffer("covs", covs.detach().clone())
        self.register_buffer("counts", counts.detach().to(torch.long).clone())

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        shrinkage: float = 0.01,
        allow_missing: bool = False,
    ) -> ClassGaussians:
        """Fit per-class means and covariances from ``features (N, D)`` and integer ``labels (N,)``.

        Statistics are accumulated in float64 and stored in ``features``' floating dtype.

        Args:
            features: (N, D).
            labels: (N,) in ``[0, num_classes)``.
            num_classes: C.
            shrinkage: added to the covariance diagonal (0.01 in LMD); must be > 0 so every class is
                positive definite.
            allow_missing: if True, a class with no sample gets mean 0, covariance ``shrinkage * I`` and
                count 0 (for per-batch statistics fed to :meth:`ema_update_` with ``mask=counts > 0``);
                if False such a class is an error.

        Raises:
            ValueError: on bad shapes, labels out of range, ``shrinkage <= 0``, or a missing class.
        """
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must be ({features.shape[0]},) to match features, got {tuple(labels.shape)}")
        if shrinkage <= 0:
            raise ValueError(f"shrinkage must be > 0 to keep covariances positive definite, got {shrinkage}")
        labels = labels.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
            )
        out_dtype = features.dtype if features.is_floating_point() else torch.get_default_dtype()
        x = features.detach().to(torch.float64)
        d = x.shape[1]
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        means = torch.zeros(num_classes, d, dtype=torch.float64, device=x.device)
        covs = eye.repeat(num_classes, 1, 1) * shrinkage
        counts = torch.bincount(labels, minlength=num_classes).to(x.device)
        missing = [c for c in range(num_classes) if int(counts[c]) == 0]
        if missing and not allow_missing:
            raise ValueError(
                f"classes {missing} have no sample in features; fit needs every class (or pass allow_missing=True)"
            )
        for c in range(num_classes):
            n = int(counts[c])
            if n == 0:
                continue
            xc = x[labels == c]  # (n_c, D)
            means[c] = xc.mean(0)
            if n > 1:
                centred = xc - means[c]
                covs[c] += centred.t() @ centred / (n - 1)
        return cls(means.to(out_dtype), covs.to(out_dtype), counts)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @torch.no_grad()
    def sample(
        self, per_class: int, generator: torch.Generator, classes: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``per_class`` virtual features from each class Gaussian, ``x = mean_c + L_c z``, ``L_c L_c^T = cov_c``.

        Args:
            per_class: samples per class (V; 50,000 in the paper).
            generator: the source of randomness; the draw happens on the generator's device, then moves to
                the statistics' device.
            classes: optional subset of classes (to sample in chunks); all classes by default.

        Returns:
            ``features (K * per_class, D)`` grouped by class and ``labels (K * per_class,)``, K = len(classes).

        Raises:
            ValueError: if ``per_class < 1`` or a class index is out of range.
        """
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        idx = list(range(self.num_classes)) if classes is None else [int(c) for c in classes]
        if any(not 0 <= c < self.num_classes for c in idx):
            raise ValueError(f"classes must lie in [0, {self.num_classes}), got {idx}")
        sel = torch.tensor(idx, dtype=torch.long, device=self.means.device)
        means, covs = self.means[sel], self.covs[sel]  # (K, D), (K, D, D)
        # Cholesky in float64: rank-deficient covariances plus a small ridge are ill-conditioned in float32.
        chol = torch.linalg.cholesky(covs.to(torch.float64)).to(means.dtype)  # (K, D, D)
        z = torch.randn(
            (len(idx), per_class, means.shape[1]), generator=generator, dtype=means.dtype, device=generator.device
        ).to(means.device)
        feats = means.unsqueeze(1) + z @ chol.transpose(1, 2)  # (K, per_class, D)
        labels = sel.repeat_interleave(per_class)
        return feats.reshape(-1, means.shape[1]), labels

    @torch.no_grad()
    def ema_update_(
        self, means: torch.Tensor, covs: torch.Tensor, decay: float = 0.999, mask: torch.Tensor | None = None
    ) -> None:
        """In place: ``stat <- decay * stat + (1 - decay) * new`` for means and covariances.

        Args:
            means: new means (C, D).
            covs: new covariances (C, D, D).
            decay: EMA decay in ``[0, 1]`` (0.999 in LMD).
            mask: optional bool (C,); only classes marked True are updated (classes absent from a batch
                keep their statistics).

        Raises:
            ValueError: on shape mismatch or ``decay`` outside ``[0, 1]``.
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if means.shape != self.means.shape or covs.shape != self.covs.shape:
            raise ValueError(
                f"means {tuple(means.shape)} / covs {tuple(covs.shape)} must match the stored "
                f"{tuple(self.means.shape)} / {tuple(self.covs.shape)}"
            )
        new_means = self.means * decay + means.detach().to(self.means) * (1.0 - decay)
        new_covs = self.covs * decay + covs.detach().to(self.covs) * (1.0 - decay)
        if mask is not None:
            if mask.shape != (self.num_classes,):
                raise ValueError(f"mask must be ({self.num_classes},), got {tuple(mask.shape)}")
            m = mask.to(device=self.means.device, dtype=torch.bool)
            new_means = torch.where(m[:, None], new_means, self.means)
            new_covs = torch.where(m[:, None, None], new_covs, self.covs)
        self.means.copy_(new_means)
        self.covs.copy_(new_covs)


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
            means: class means (C, D), e.g. ``ClassGaussians.means``.
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
