"""Backbones by name: a few built-in ones (registered here) and every timm architecture.

``create_backbone(name)`` returns a feature extractor that maps images ``(B, in_chans, H, W)`` to pooled
features ``(B, D)`` and its feature dimension ``D``. timm models are created with ``num_classes=0`` (pooled
features, no classifier) and ``pretrained=False`` always: weights never come from the network, only from
:func:`ltcore.models.pretrained.load_pretrained` (a local path, an object-storage URI, or the bundled
EfficientNet-Lite0 package), because hospital clusters are often offline.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
from torch import nn

from ltcore.models.pretrained import load_pretrained

BackboneFactory = Callable[[int], tuple[nn.Module, int]]

_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory(in_chans) -> (module, feat_dim)`` under ``name`` (shadows timm names)."""

    def deco(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def list_backbones() -> list[str]:
    """Names of the built-in backbones; any name in ``timm.list_models()`` works as well."""
    return sorted(_REGISTRY)


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers and global average pooling: the fast demo backbone for 32x32 images.

    Input ``(B, in_chans, H, W)`` with any H, W >= 8; output ``(B, width * 4)`` (128 by default).
    """

    def __init__(self, in_chans: int = 3, width: int = 32) -> None:
        super().__init__()
        chans = [in_chans, width, width * 2, width * 4, width * 4]
        strides = [1, 2, 2, 1]  # 32 -> 32 -> 16 -> 8 -> 8: keeps enough spatial detail for 8x8 upscaled digits
        layers: list[nn.Module] = []
        for c_in, c_out, s in zip(chans[:-1], chans[1:], strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)  # (B, D)


@register_backbone("small_cnn")
def _small_cnn(in_chans: int) -> tuple[nn.Module, int]:
    model = SmallCNN(in_chans=in_chans)
    return model, model.num_features


def create_backbone(name: str, pretrained: str = "none", in_chans: int = 3) -> tuple[nn.Module, int]:
    """Build a backbone by name and optionally load weights.

    Args:
        name: a built-in name (:func:`list_backbones`, e.g. ``small_cnn``) or any timm architecture
            (``resnet18``, ``resnet50``, ``tf_efficientnet_lite0``, ...).
        pretrained: ``none``, ``package`` (bundled ImageNet weights; ``tf_efficientnet_lite0`` only), or a
            local path / URI (``s3://...``) of a torch state dict. See :func:`load_pretrained`.
        in_chans: number of input image channels.

    Returns:
        ``(module, feat_dim)``; ``module(x)`` maps ``(B, in_chans, H, W)`` to ``(B, feat_dim)``.

    Raises:
        ValueError: unknown name, or weights that do not fit the architecture.
    """
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if name in _REGISTRY:
        model, feat_dim = _REGISTRY[name](in_chans)
    elif timm.is_model(name):
        # pretrained=False always: timm would otherwise try to download from the Hugging Face hub.
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
        feat_dim = int(model.num_features)  # type: ignore[arg-type]  # an int attribute on every timm model
    else:
        family = name.split("_")[0].rstrip("0123456789") or name
        raise ValueError(f"unknown backbone {name!r}: use one of {list_backbones()} or a timm architecture "
                         f"name (see timm.list_models('{family}*'), e.g. timm.list_models('resnet*'))")
    load_pretrained(model, pretrained, backbone_name=name)  # no-op for 'none'
    return model, feat_dim
