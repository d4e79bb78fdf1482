"""Batch augmentations: spectral-residual saliency and SPMix."""

from __future__ import annotations

from ltcore.augment.saliency import spectral_residual_saliency
from ltcore.augment.spmix import SPMix, patch_scores, spmix

__all__ = ["SPMix", "patch_scores", "spectral_residual_saliency", "spmix"]
