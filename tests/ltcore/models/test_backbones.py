from __future__ import annotations

import pytest
import torch

from ltcore.models.backbones import create_backbone, list_backbones

# Every backbone the configs name; 32x32 keeps them fast on CPU (timm models pool globally).
BACKBONES = [("small_cnn", 128), ("resnet18", 512), ("tf_efficientnet_lite0", 1280)]


@pytest.mark.parametrize(("name", "dim"), BACKBONES)
def test_backbone_shapes_and_finite(name: str, dim: int) -> None:
    torch.manual_seed(0)
    model, feat_dim = create_backbone(name)
    assert feat_dim == dim
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, dim)
    assert torch.isfinite(out).all()


def test_small_cnn_registered_and_other_in_chans() -> None:
    assert "small_cnn" in list_backbones()
    model, dim = create_backbone("small_cnn", in_chans=1)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 16, 16)).shape == (3, dim)


def test_small_cnn_trains_in_train_mode() -> None:
    model, _ = create_backbone("small_cnn")
    out = model(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_backbone_names_it_and_suggests_timm() -> None:
    with pytest.raises(ValueError, match=r"'resnett18'.*timm\.list_models"):
        create_backbone("resnett18")


def test_timm_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    seen: list[object] = []
    real = timm.create_model

    def spy(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("pretrained"))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    create_backbone("resnet18")
    assert seen == [False]
