from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ltcore.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GridDropout,
    build_transform,
    decode_image,
    normalize_images,
    seeded,
)


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _noise(h: int = 30, w: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def test_decode_png_roundtrip_and_grey_to_rgb():
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    out = decode_image(_encode(arr))
    assert out.dtype == torch.uint8 and out.shape == (3, 5, 7)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), arr)  # PNG is lossless
    grey = decode_image(_encode(arr[:, :, 0]))
    assert grey.shape == (3, 5, 7)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert np.array_equal(grey[0].numpy(), arr[:, :, 0])


def test_decode_jpeg():
    arr = np.full((8, 10, 3), 200, np.uint8)
    out = decode_image(_encode(arr, "JPEG"))
    assert out.shape == (3, 8, 10)
    assert abs(int(out.float().mean()) - 200) <= 2  # JPEG of a flat image is nearly exact


def test_decode_rejects_garbage():
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(b"not an image at all")
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("kind", ["weak", "strong", "test", "resize_flip"])
@pytest.mark.parametrize("size", [16, 24])
def test_shapes_from_tensor_and_pil(kind, size):
    t = build_transform(kind, size)
    x = _noise()
    out = t(x)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, size, size)
    assert torch.isfinite(out).all()
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    assert t(pil).shape == (3, size, size)


def test_test_transform_constant_image_value():
    # a flat grey 128 image stays flat through resize + crop; channel c becomes (128/255 - mean_c) / std_c,
    # e.g. channel 0: (0.5019608 - 0.485) / 0.229 = 0.0169608 / 0.229 = 0.0740646
    x = torch.full((3, 30, 40), 128, dtype=torch.uint8)
    out = build_transform("test", 16)(x)
    expected = [(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert expected[0] == pytest.approx(0.0740646, abs=1e-7)
    for c in range(3):
        assert torch.allclose(out[c], torch.full((16, 16), expected[c]), atol=1e-5)
    # same for the weak view: crops and flips of a flat image are flat
    weak = build_transform("weak", 16)(x)
    assert torch.allclose(weak[0], torch.full((16, 16), expected[0]), atol=1e-5)


def test_test_transform_is_resize_then_centre_crop():
    # 30 x 40 -> shorter side 15 -> 15 x 20 -> centre crop 15 x 15 (columns 2..16 of the resized image)
    x = _noise(30, 40)
    out = build_transform("test", 15, mean=(0, 0, 0), std=(1, 1, 1))(x)
    from torchvision.transforms.v2 import functional as F

    ref = F.resize(x, [15, 20], antialias=True)[:, :, 2:17].float() / 255
    assert torch.allclose(out, ref, atol=1e-6)


def test_resize_flip_is_the_test_view_flipped_never_cropped():
    # LMD's teacher view: resize + centre crop exactly as the test view, then random h/v flips. Every output is
    # one of the four flips of the test view; a random resized crop (the weak view) would give none of them.
    x = _noise(30, 40)
    base = build_transform("test", 16)(x)
    flips = {"none": base, "h": base.flip(-1), "v": base.flip(-2), "hv": base.flip(-1).flip(-2)}
    t = build_transform("resize_flip", 16)
    seen = set()
    for seed in range(12):
        with seeded(seed):
            out = t(x)
        match = [name for name, ref in flips.items() if torch.equal(out, ref)]
        assert match, f"seed {seed}: not a flip of the test view"
        seen.add(match[0])
    assert len(seen) >= 3  # the flips are random (each of the 4 outcomes has probability 1/4)
    weak = build_transform("weak", 16)
    with seeded(0):
        w = weak(x)
    assert not any(torch.equal(w, ref) for ref in flips.values())


def test_random_views_are_random_and_seedable():
    x = _noise()
    for kind in ("weak", "strong", "resize_flip"):
        t = build_transform(kind, 24)
        with seeded(7):
            a = t(x)
        with seeded(7):
            b = t(x)
        with seeded(8):
            c = t(x)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    test = build_transform("test", 24)
    assert torch.equal(test(x), test(x))


def test_seeded_restores_the_global_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(5):
        torch.rand(10)
    assert torch.equal(torch.rand(3), expected)


def test_build_transform_rejects_unknown_kind():
    with pytest.raises(ValueError, match="choose one of weak, strong, test, resize_flip"):
        build_transform("medium", 32)
    with pytest.raises(ValueError, match="image_size"):
        build_transform("weak", 4)


def test_grid_dropout():
    img = torch.ones(3, 40, 40)
    assert torch.equal(GridDropout(p=0.0)(img), img)  # identity when never applied
    torch.manual_seed(0)
    out = GridDropout(ratio=0.5, unit_range=(10, 10), p=1.0)(img)
    # unit 10, hole side 5: a 5 x 5 hole in every 10 x 10 cell -> a quarter of the pixels zeroed, per channel
    assert (out == 0).float().mean().item() == pytest.approx(0.25)
    assert torch.equal(out[0] == 0, out[1] == 0)
    with pytest.raises(ValueError, match="ratio"):
        GridDropout(ratio=1.5)


def test_transforms_import_without_ray():
    import subprocess
    import sys

    code = "import sys; sys.modules['ray'] = None\nimport ltcore.data.transforms"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("kind", ["weak", "strong", "test", "resize_flip"])
def test_uint8_part_plus_normalize_equals_full_transform(kind):
    x = _noise()
    part = build_transform(kind, 24, normalize=False)
    with seeded(11):
        full = build_transform(kind, 24)(x)
    with seeded(11):
        u8 = part(x)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 24, 24)
    assert torch.equal(normalize_images(u8), full)
    # batched: (B, 3, S, S) normalises per channel the same way
    assert torch.equal(normalize_images(torch.stack([u8, u8]))[1], full)


def test_normalize_images_values():
    # 0 -> (0 - .485) / .229 = -2.117904; 255 -> (1 - .485) / .229 = 2.248908 (channel 0)
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2)
    out = normalize_images(x)
    assert out[0, 0, 0].item() == pytest.approx(-2.117904, abs=1e-6)
    assert out[0, 0, 1].item() == pytest.approx(2.248908, abs=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(torch.zeros(3, 2, 2))


def test_grid_dropout_fill_colour():
    img = torch.full((3, 20, 20), 7, dtype=torch.uint8)
    torch.manual_seed(0)
    out = GridDropout(ratio=0.5, unit_range=(10, 10), p=1.0, fill=(124, 116, 104))(img)
    holes = out[0] != 7
    assert holes.float().mean().item() == pytest.approx(0.25)  # 5 x 5 holes in 10 x 10 cells
    assert out[0][holes].unique().tolist() == [124] and out[2][holes].unique().tolist() == [104]
