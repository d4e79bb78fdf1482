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

import torch
from torch import nn

from ltcore.losses import ClassGaussians, FDCLoss, GeneralizedCELoss
from ltcore.models.heads import LinearHead

__all__ = ["e_step_loss", "fit_class_gaussians", "m_step"]


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
