"""Loss functions: one module per loss family (the "Baseline losses" section of METHODS.md)."""

from __future__ import annotations

from ltcore.losses.balanced_softmax import BalancedSoftmaxLoss
from ltcore.losses.ce import CrossEntropyLoss
from ltcore.losses.class_balanced import DeferredReweighting, as_class_counts, class_balanced_weights
from ltcore.losses.focal import FocalLoss
from ltcore.losses.ldam import LDAMLoss
from ltcore.losses.logit_adjust import LogitAdjustedLoss, posthoc_logit_adjust

__all__ = [
    "BalancedSoftmaxLoss",
    "CrossEntropyLoss",
    "DeferredReweighting",
    "FocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "as_class_counts",
    "class_balanced_weights",
    "posthoc_logit_adjust",
]
