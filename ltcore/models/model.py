"""The model every method trains: backbone -> pooled features -> classifier head (+ optional heads).

``LTModel.forward(x)`` returns a dict so that methods read what they need by name:

- ``features`` ``(B, D)``: what the classifier sees (what stage-2 calibrators and prototypes use): the pooled
  backbone features, or ``neck(backbone features)`` when a recipe installed a neck (:meth:`LTModel.set_neck`),
- ``logits`` ``(B, C)``: the classifier head on the features,
- ``backbone_features`` ``(B, D)``: the pooled backbone features before the neck (only when there is a neck),
- ``embedding`` ``(B, P)``: L2-normalised projection for contrastive / metric losses (when ``proj_dim > 0``),
- ``aux_logits`` ``(B, 2)``: a 2-way linear head on the features (JRCL's auxiliary binary task; when
  ``aux_binary``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ltcore.models.backbones import create_backbone
from ltcore.models.heads import CosineHead, LinearHead, ProjectionMLP

HEADS = ("linear", "cosine")


class LTModel(nn.Module):
    """Backbone, classifier head, and optional projector / auxiliary binary head.

    Args:
        backbone: module mapping images ``(B, C_in, H, W)`` to pooled features ``(B, feat_dim)``.
        feat_dim: the backbone's feature dimension ``D``.
        num_classes: number of classes ``C``.
        head: ``linear`` (:class:`LinearHead`) or ``cosine`` (:class:`CosineHead`).
        proj_dim: size ``P`` of the L2-normalised projection; 0 for none.
        aux_binary: add a 2-way linear head ``aux_head`` on the features.
        proj_hidden_dim: hidden width of the projector; 0 means ``feat_dim``.
        cosine_scale: ``scale`` of the cosine head.

    Raises:
        ValueError: unknown head, non-positive sizes, or (at forward) a backbone whose output is not
            ``(B, feat_dim)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        num_classes: int,
        head: str = "linear",
        proj_dim: int = 0,
        aux_binary: bool = False,
        proj_hidden_dim: int = 0,
        cosine_scale: float = 16.0,
    ) -> None:
        super().__init__()
        if feat_dim < 1 or num_classes < 1:
            raise ValueError(f"LTModel needs feat_dim >= 1 and num_classes >= 1, got {feat_dim}, {num_classes}")
        if proj_dim < 0:
            raise ValueError(f"proj_dim must be >= 0 (0 = no projector), got {proj_dim}")
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.head_type = head
        self.head: nn.Module
        if head == "linear":
            self.head = LinearHead(feat_dim, num_classes)
        elif head == "cosine":
            self.head = CosineHead(feat_dim, num_classes, scale=cosine_scale)
        else:
            raise ValueError(f"unknown head {head!r}; use one of {list(HEADS)}")
        self.projector = ProjectionMLP(feat_dim, proj_hidden_dim or feat_dim, proj_dim) if proj_dim > 0 else None
        self.aux_head = nn.Linear(feat_dim, 2) if aux_binary else None
        self.neck: nn.Sequential | None = None

    def set_neck(self, hidden_dim: int = 0) -> nn.Sequential:
        """Put a trainable MLP ``f = W2 relu(W1 h + b1) + b2`` (D -> hidden -> D) between backbone and head.

        For recipes whose classifier reads a projection of the backbone features rather than the features
        themselves (ProCo's projector F). The neck is part of the model: it is optimised, checkpointed and
        used by prediction and stage 2, and :meth:`load_state_dict` rebuilds it from a checkpoint that has one,
        so a model built without it (evaluation, stage 2) still loads such a checkpoint.

        Args:
            hidden_dim: hidden width; 0 means ``feat_dim``.

        Returns:
            The neck (also ``self.neck``).

        Raises:
            RuntimeError: if the model already has a neck.
        """
        if self.neck is not None:
            raise RuntimeError("the model already has a neck")
        d = self.feat_dim
        self.neck = nn.Sequential(nn.Linear(d, hidden_dim or d), nn.ReLU(inplace=True), nn.Linear(hidden_dim or d, d))
        return self.neck

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, after building the neck when ``state_dict`` has one and the model not."""
        if self.neck is None and "neck.0.weight" in state_dict:
            w = state_dict["neck.0.weight"]
            self.set_neck(int(w.shape[0])).to(w.device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C_in, H, W)`` -> pooled backbone features ``(B, D)``, before any neck."""
        feats = self.backbone(x)
        if feats.ndim != 2 or feats.shape[1] != self.feat_dim:
            raise ValueError(f"backbone returned shape {tuple(feats.shape)}, expected (B, {self.feat_dim}); "
                             "create it with num_classes=0 (pooled features) and pass its feature dim")
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C_in, H, W)`` -> the features the classifier sees ``(B, D)`` (after the neck, if any)."""
        h = self.backbone_features(x)
        return h if self.neck is None else self.neck(h)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``(B, D)`` -> logits ``(B, C)``."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone_features(x)  # (B, D)
        feats = h if self.neck is None else self.neck(h)  # (B, D)
        out = {"features": feats, "logits": self.classify(feats)}  # logits (B, C)
        if self.neck is not None:
            out["backbone_features"] = h
        if self.projector is not None:
            out["embedding"] = self.projector(feats)  # (B, P), unit norm
        if self.aux_head is not None:
            out["aux_logits"] = self.aux_head(feats)  # (B, 2)
        return out


def build_model(
    *,
    num_classes: int,
    backbone: str = "resnet18",
    pretrained: str = "none",
    head: str = "linear",
    proj_dim: int = 0,
    aux_binary: bool = False,
    in_chans: int = 3,
    proj_hidden_dim: int = 0,
    cosine_scale: float = 16.0,
) -> LTModel:
    """Create the backbone by name (see :func:`create_backbone`), load ``pretrained``, and wrap it in an LTModel."""
    net, feat_dim = create_backbone(backbone, pretrained=pretrained, in_chans=in_chans)
    return LTModel(net, feat_dim, num_classes, head=head, proj_dim=proj_dim, aux_binary=aux_binary,
                   proj_hidden_dim=proj_hidden_dim, cosine_scale=cosine_scale)
