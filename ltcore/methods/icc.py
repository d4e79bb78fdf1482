"""The pure parts of LMD's stage 2, iterative classifier calibration (ICC; METHODS.md section 4).

"Long-tailed Medical Diagnosis with Relation-aware Representation Learning and Iterative Classifier
Calibration" (Pan et al., arXiv 2502.03238). One ICC round:

1. extract features of the training split with test transforms (the caller);
2. :func:`fit_class_gaussians`: one Gaussian per class (mean, unbiased covariance + 0.01 I); the caller smooths
   them into the EMA statistics used by FDC (``ema.ema_update_(g.means, g.covs, decay=ema_alpha(round))``
   from the second round on, the first round's fit being the start, as in the public code);
3. :func:`m_step`: a freshly initialised linear classifier trained on virtual features only (one pass, CE);
4. E-step: the classifier frozen, the backbone fine-tuned for one pass over real images with
   :func:`e_step_loss` (GCE + 1e-4 FDC).

The Ray Train loop that runs the rounds is the engine's; nothing here imports Ray.

**Interpretation** (METHODS.md): the public code's FDC pulls features toward the *other* classes and its GCE
term runs under no-grad; we use ``L_FDC = mean_i [M_iy/2 + logsumexp_c(-M_ic/2)]`` (log space: the exponential
form underflows to 0 for D above ~64) and GCE with gradients.
The public code also keeps one classifier (and its optimiser) across rounds; METHODS.md asks for a fresh one
per round, which is the default here (``init`` warm-starts instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ltcore.losses import FDCLoss, GeneralizedCELoss
from ltcore.methods.lmd_rrl import ema_alpha
from ltcore.models.heads import LinearHead

# ema_alpha: the per-round decay of the class statistics, the same ramp as RRL's teacher (re-exported for the engine)
__all__ = ["ClassGaussians", "e_step_loss", "ema_alpha", "fit_class_gaussians", "m_step"]


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


def fit_class_gaussians(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float = 0.01
) -> ClassGaussians:
    """One Gaussian per class from ``features (N, D)`` and integer ``labels (N,)``.

    ``means (C, D)`` and unbiased covariances ``(C, D, D)`` plus ``shrinkage * I`` (0.01 in LMD), as
    :meth:`ClassGaussians.fit`.

    Raises:
        ValueError: bad shapes, labels outside ``[0, num_classes)``, ``shrinkage <= 0``, or a class with no
            sample (every class must be in the training split).
    """
    return ClassGaussians.fit(features, labels, num_classes, shrinkage=shrinkage)


def m_step(
    gaussians: ClassGaussians,
    per_class: int,
    feat_dim: int,
    num_classes: int,
    lr: float,
    epochs: int = 1,
    batch_size: int = 256,
    *,
    generator: torch.Generator,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    init: nn.Linear | None = None,
) -> LinearHead:
    """Train a linear classifier on ``per_class`` virtual features per class drawn from ``gaussians`` (CE).

    Features are sampled once per call (V per class, ``ClassGaussians.sample``), shuffled with ``generator``
    every epoch and fed in mini-batches to SGD (momentum 0.9, weight decay 1e-4, as the public code). The
    classifier is freshly initialised from ``generator`` (``nn.Linear``'s default ranges, ``U(+-1/sqrt(D))``)
    unless ``init`` is given, whose weights are copied (not modified). Training runs on the statistics' device.

    With a fresh classifier and a single pass, ``lr`` must be large enough to fit it in
    ``C * per_class / batch_size`` steps (e.g. 0.1 for a few hundred samples per class); the public code's
    1e-5 assumes a classifier kept across 200 rounds of 50,000 samples per class.

    Args:
        gaussians: the class Gaussians (C classes of dimension D).
        per_class: V, virtual features per class.
        feat_dim: D (checked against ``gaussians``).
        num_classes: C (checked against ``gaussians``).
        lr: SGD learning rate.
        epochs: passes over the virtual features (1 in LMD).
        batch_size: mini-batch size.
        generator: randomness of the draw, the shuffles and the initialisation (a CPU generator works for
            statistics on any device).
        momentum, weight_decay: SGD settings.
        init: optional classifier to start from (``(C, D)`` weight).

    Returns:
        The trained :class:`~ltcore.models.heads.LinearHead` (an ``nn.Linear``) in eval mode, on the
        statistics' device.

    Raises:
        ValueError: on sizes that do not match ``gaussians``, or non-positive ``per_class``, ``lr``, ``epochs``
            or ``batch_size``.
    """
    c, d = gaussians.means.shape
    if (c, d) != (num_classes, feat_dim):
        raise ValueError(f"gaussians are ({c} classes, dim {d}) but num_classes={num_classes}, feat_dim={feat_dim}")
    for name, v in (("per_class", per_class), ("epochs", epochs), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = gaussians.means.device
    x, y = gaussians.sample(per_class, generator)  # (C * V, D), (C * V,)
    x, y = x.to(device=device, dtype=torch.float32), y.to(device)
    head = LinearHead(feat_dim, num_classes)
    with torch.no_grad():
        if init is not None:
            if init.weight.shape != (num_classes, feat_dim):
                raise ValueError(f"init.weight must be ({num_classes}, {feat_dim}), got {tuple(init.weight.shape)}")
            head.weight.copy_(init.weight)
            if init.bias is not None:
                head.bias.copy_(init.bias)
            else:
                head.bias.zero_()
        else:
            bound = 1.0 / math.sqrt(feat_dim)
            for p in (head.weight, head.bias):
                u = torch.rand(p.shape, generator=generator, device=generator.device)
                p.copy_((2 * u - 1) * bound)
    head = head.to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    n = x.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator, device=generator.device).to(device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss = loss_fn(head(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    head.eval()
    return head


def e_step_loss(
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    ema_means: torch.Tensor,
    ema_covs: torch.Tensor,
    gce_q: float = 0.7,
    fdc_weight: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The E-step loss ``GCE_q(logits, y) + fdc_weight * L_FDC(features, y; ema_means, ema_covs)``.

    ``GCE_q = mean (1 - p_y^q) / q`` (generalised CE, q = 0.7) **with gradients** (through the frozen
    classifier into the backbone); ``L_FDC = mean_i [M_iy/2 + logsumexp_c(-M_ic/2)]`` with ``M`` the squared
    Mahalanobis distance of each feature to each EMA class Gaussian (statistics detached). This is our
    **interpretation** of the public code (which computes GCE under no-grad and has FDC's sign pulling
    features toward other classes); see :class:`~ltcore.losses.FDCLoss`. FDC is computed in float32 with
    autocast off (it factorises the covariances).

    Args:
        features: backbone features (B, D).
        logits: the frozen classifier's logits on them (B, C).
        labels: (B,) integer classes.
        ema_means: (C, D) EMA class means.
        ema_covs: (C, D, D) EMA class covariances (positive definite).
        gce_q: q of GCE, in ``(0, 1]``.
        fdc_weight: weight of FDC (1e-4 in LMD).

    Returns:
        ``(loss, {"gce": ..., "fdc": ...})``: the scalar loss and its two unweighted terms as floats.

    Raises:
        ValueError: on mismatched shapes or labels out of range.
    """
    gce = GeneralizedCELoss(q=gce_q)(logits, labels)
    if fdc_weight == 0.0:
        return gce, {"gce": float(gce.detach()), "fdc": 0.0}
    with torch.autocast(device_type=features.device.type, enabled=False):
        fdc = FDCLoss()(features.float(), labels, ema_means.float(), ema_covs.float())
    loss = gce + fdc_weight * fdc
    return loss, {"gce": float(gce.detach()), "fdc": float(fdc.detach())}
