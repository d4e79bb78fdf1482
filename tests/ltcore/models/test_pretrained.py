from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltcore import storage
from ltcore.models.backbones import create_backbone
from ltcore.models.pretrained import (
    PACKAGE_BACKBONE,
    PACKAGE_MEAN,
    PACKAGE_STD,
    imagenet_model,
    load_pretrained,
    package_state_dict,
)


def _imagenet_input(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> (1, 3, 224, 224): resize the whole image to 224, then (x - 0.5) / 0.5."""
    x = torch.from_numpy(img).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(PACKAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PACKAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_package_state_dict_layout() -> None:
    sd = package_state_dict()
    assert len(sd) == 296
    assert next(iter(sd)) == "_conv_stem.weight"
    assert sd["_fc.weight"].shape == (1000, 1280)


def test_package_weights_classify_chelsea_and_coffee() -> None:
    data = pytest.importorskip("skimage.data")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = imagenet_model()
    with torch.no_grad():
        logits = model(torch.cat([_imagenet_input(data.chelsea()), _imagenet_input(data.coffee())]))
    probs = logits.softmax(dim=1)
    # ImageNet 285 = Egyptian cat, 967 = espresso; measured top-1 probabilities ~0.79 and ~0.88.
    assert probs.argmax(dim=1).tolist() == [285, 967]
    assert probs[0, 285] > 0.5 and probs[1, 967] > 0.5


def test_package_backbone_gets_body_weights() -> None:
    model, _ = create_backbone(PACKAGE_BACKBONE, pretrained="package")
    sd = package_state_dict()
    torch.testing.assert_close(model.state_dict()["conv_stem.weight"], sd["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.state_dict()["bn2.running_var"], sd["_bn1.running_var"], rtol=0, atol=0)


def test_package_with_other_backbone_raises() -> None:
    with pytest.raises(ValueError, match=r"only for 'tf_efficientnet_lite0'.*state dict"):
        create_backbone("resnet18", pretrained="package")


def test_package_with_wrong_in_chans_raises() -> None:
    with pytest.raises(ValueError, match=r"_conv_stem\.weight"):
        create_backbone(PACKAGE_BACKBONE, pretrained="package", in_chans=1)


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_state_dict_path_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src, _ = create_backbone("small_cnn")
    src.train()
    src(torch.randn(8, 3, 16, 16))  # moves BN running stats off their init, so they must be loaded too
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    dst, _ = create_backbone("small_cnn", pretrained=str(path))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_outputs(dst, x), _outputs(src, x), rtol=0, atol=0)


def test_wrapped_and_prefixed_state_dict_via_uri() -> None:
    torch.manual_seed(0)
    src, _ = create_backbone("small_cnn")
    wrapped = {"state_dict": {f"module.backbone.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    import io

    buf = io.BytesIO()
    torch.save(wrapped, buf)
    uri = "memory://ltcore-test-models/ckpt.pt"
    storage.write_bytes(uri, buf.getvalue())
    dst, _ = create_backbone("small_cnn", pretrained=uri)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_outputs(dst, x), _outputs(src, x), rtol=0, atol=0)


def test_classifier_keys_are_ignored_for_feature_model(tmp_path: Path) -> None:
    import timm

    full = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save({"model": full.state_dict()}, path)
    feat, _ = create_backbone("resnet18", pretrained=str(path))
    torch.testing.assert_close(feat.state_dict()["conv1.weight"], full.state_dict()["conv1.weight"], rtol=0, atol=0)


def test_mismatched_state_dict_raises(tmp_path: Path) -> None:
    src, _ = create_backbone("small_cnn")
    sd = src.state_dict()
    sd.pop("features.0.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing keys \['features.0.weight'\].*unexpected keys \['extra.weight'\]"):
        create_backbone("small_cnn", pretrained=str(path))


def test_wrong_shapes_raise(tmp_path: Path) -> None:
    src, _ = create_backbone("small_cnn", in_chans=1)
    path = tmp_path / "gray.pt"
    torch.save(src.state_dict(), path)
    with pytest.raises(ValueError, match=r"wrong shape.*features.0.weight"):
        create_backbone("small_cnn", pretrained=str(path))


def test_missing_file_and_non_state_dict(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        create_backbone("small_cnn", pretrained=str(tmp_path / "nope.pt"))
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="not a state dict"):
        create_backbone("small_cnn", pretrained=str(path))


def test_none_keeps_model_unchanged() -> None:
    model, _ = create_backbone("small_cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_pretrained(model, "none", backbone_name="small_cnn")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.s3
def test_state_dict_from_s3(s3_bucket: str) -> None:
    import io

    torch.manual_seed(0)
    src, _ = create_backbone("small_cnn")
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    uri = f"{s3_bucket}/weights/small_cnn.pt"
    storage.write_bytes(uri, buf.getvalue())
    dst, _ = create_backbone("small_cnn", pretrained=uri)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_outputs(dst, x), _outputs(src, x), rtol=0, atol=0)
