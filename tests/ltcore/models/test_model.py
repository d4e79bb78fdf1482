from __future__ import annotations

import pytest
import torch
from torch import nn

from ltcore.models.heads import CosineHead, LinearHead
from ltcore.models.model import LTModel, build_model


def test_forward_outputs_all_heads() -> None:
    torch.manual_seed(0)
    model = build_model(backbone="small_cnn", num_classes=5, proj_dim=16, aux_binary=True)
    out = model(torch.randn(3, 3, 32, 32))
    assert set(out) == {"features", "logits", "embedding", "aux_logits"}
    assert out["features"].shape == (3, 128)
    assert out["logits"].shape == (3, 5)
    assert out["embedding"].shape == (3, 16)
    assert out["aux_logits"].shape == (3, 2)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_plain_model_has_only_features_and_logits() -> None:
    model = build_model(backbone="small_cnn", num_classes=4)
    assert model.projector is None and model.aux_head is None
    assert isinstance(model.head, LinearHead)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert set(out) == {"features", "logits"}
        # forward == classify(forward_features)
        torch.testing.assert_close(out["logits"], model.classify(model.forward_features(x)))


def test_timm_backbone_and_cosine_head() -> None:
    model = build_model(backbone="resnet18", num_classes=3, head="cosine")
    assert isinstance(model.head, CosineHead)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out["features"].shape == (2, 512) and out["logits"].shape == (2, 3)
    assert out["logits"].abs().max() <= 16.0 + 1e-4


def test_unknown_head_raises() -> None:
    with pytest.raises(ValueError, match="unknown head 'mlp'"):
        build_model(backbone="small_cnn", num_classes=3, head="mlp")


def test_backbone_with_wrong_output_shape_is_a_clear_error() -> None:
    model = LTModel(nn.Conv2d(3, 4, 1), feat_dim=4, num_classes=2)  # returns a feature map, not pooled features
    with pytest.raises(ValueError, match=r"expected \(B, 4\)"):
        model(torch.randn(1, 3, 8, 8))
