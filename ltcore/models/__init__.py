"""Backbones (built-in + timm, offline weights), classifier / projection heads, and the LTModel wrapper."""

from __future__ import annotations

from ltcore.models.backbones import SmallCNN, create_backbone, list_backbones, register_backbone
from ltcore.models.heads import CosineHead, LinearHead, ProjectionMLP
from ltcore.models.model import HEADS, LTModel, build_model
from ltcore.models.pretrained import (
    PACKAGE_BACKBONE,
    PACKAGE_MEAN,
    PACKAGE_STD,
    imagenet_model,
    load_pretrained,
    load_state_dict_uri,
)

__all__ = [
    "HEADS",
    "PACKAGE_BACKBONE",
    "PACKAGE_MEAN",
    "PACKAGE_STD",
    "CosineHead",
    "LTModel",
    "LinearHead",
    "ProjectionMLP",
    "SmallCNN",
    "build_model",
    "create_backbone",
    "imagenet_model",
    "list_backbones",
    "load_pretrained",
    "load_state_dict_uri",
    "register_backbone",
]
