"""LMD's iterative classifier calibration as one object: the rounds' state and the two steps of a round.

Pan et al., "Long-tailed medical diagnosis with relation-aware representation learning and iterative classifier
calibration", arXiv 2502.03238. The worker loop (``ltcore.engine.loops.icc_loop``) runs the rounds on Ray Train;
what a round computes is here, next to the other calibrators, with no Ray in it:

- M-step: class Gaussians of the real training features, smoothed into EMA statistics; a fresh linear
  classifier trained on virtual features drawn from the Gaussians (:func:`ltcore.methods.icc.m_step`).
- E-step loss: GCE through the frozen classifier + FDC against the EMA statistics
  (:func:`ltcore.methods.icc.e_step_loss`), for one pass of backbone fine-tuning on augmented real images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ltcore.methods.icc import ClassGaussians, e_step_loss, ema_alpha, fit_class_gaussians, m_step


class IccCalibrator:
    """The EMA class statistics carried across rounds, with the M-step and the E-step loss of a round.

    Args:
        num_classes: C.
        feat_dim: D, the backbone's feature size.
    """

    def __init__(self, *, num_classes: int, feat_dim: int) -> None:
        self.num_classes, self.feat_dim = num_classes, feat_dim
        self.ema = ClassGaussians(torch.zeros(num_classes, feat_dim), torch.eye(feat_dim).repeat(num_classes, 1, 1))
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # the statistics on a device, per round

    def m_step(self, features: torch.Tensor, labels: torch.Tensor, rnd: int, per_class: int, *, lr: float,
               seed: int) -> nn.Module:
        """Round ``rnd``'s classifier, frozen: Gaussians of ``features (N, D)`` / ``labels (N,)`` (all workers'),
        the EMA statistics updated with them, a fresh linear head fitted on ``per_class`` virtual features per
        class drawn with ``seed`` (every worker gets the same head from the same gathered data and seed)."""
        gauss = fit_class_gaussians(features, labels, self.num_classes)
        self.ema.ema_update_(gauss.means, gauss.covs, decay=ema_alpha(rnd))
        self._on.clear()
        gen = torch.Generator().manual_seed(seed)
        head = m_step(gauss, per_class, self.feat_dim, self.num_classes, lr=lr, generator=gen)
        head.requires_grad_(False)
        return head

    def e_step_loss(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, *, gce_q: float,
                    fdc_weight: float) -> torch.Tensor:
        """GCE + FDC of a batch: ``features (B, D)``, ``logits (B, C)`` of the frozen head, ``labels (B,)``."""
        if features.device not in self._on:  # (C, D, D) copied once per round, not once per batch
            self._on[features.device] = (self.ema.means.to(features.device), self.ema.covs.to(features.device))
        means, covs = self._on[features.device]
        loss, _ = e_step_loss(features, logits, labels, means, covs, gce_q=gce_q, fdc_weight=fdc_weight)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state)
        self._on.clear()
