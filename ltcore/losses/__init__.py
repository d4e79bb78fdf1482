"""Loss functions: one module per loss family (METHODS.md: the baselines and the five papers' losses)."""

from __future__ import annotations

from ltcore.losses.balanced_softmax import BalancedSoftmaxLoss
from ltcore.losses.ce import CrossEntropyLoss
from ltcore.losses.class_balanced import DeferredReweighting, as_class_counts, class_balanced_weights
from ltcore.losses.focal import FocalLoss
from ltcore.losses.jrcl import BDCLoss, OneToAllSupConLoss, binary_targets
from ltcore.losses.ldam import LDAMLoss
from ltcore.losses.lmd import FDCLoss, GeneralizedCELoss, RelationDistillationLoss
from ltcore.losses.logit_adjust import LogitAdjustedLoss
from ltcore.losses.proco import ProCoLoss, recalibration_weights
from ltcore.losses.supcon import SupConLoss
from ltcore.losses.triplet import BatchHardTripletLoss, ClassCentreTripletLoss

__all__ = [
    "BDCLoss",
    "BalancedSoftmaxLoss",
    "BatchHardTripletLoss",
    "ClassCentreTripletLoss",
    "CrossEntropyLoss",
    "DeferredReweighting",
    "FDCLoss",
    "FocalLoss",
    "GeneralizedCELoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "OneToAllSupConLoss",
    "ProCoLoss",
    "RelationDistillationLoss",
    "SupConLoss",
    "as_class_counts",
    "binary_targets",
    "class_balanced_weights",
    "recalibration_weights",
]
