"""Image decoding and the weak / strong / test transforms (torchvision.transforms.v2).

Every transform takes a uint8 image tensor ``(3, H, W)`` (or a PIL image) and returns a float32 tensor
``(3, S, S)`` normalised with ``mean`` / ``std``. All random steps run on uint8 (cheaper); the float conversion
and normalisation come last and can be split off (``normalize=False`` + :func:`normalize_images`), which lets
ingest move uint8 images (a quarter of the bytes) and normalise them where they are consumed.

- ``weak``: random resized crop (scale 0.6-1) and horizontal + vertical flips (dermoscopy and X-ray crops have
  no canonical left/right).
- ``resize_flip``: LMD's teacher view, "resize, flips" (Pan et al., arXiv 2502.03238): the test view's resize
  and centre crop, then random horizontal + vertical flips; no random crop, so the teacher sees the whole
  image at one scale. **Interpretation**: the public code resizes to a square (albumentations ``Resize``);
  we keep the aspect ratio as the test view does, so the teacher and the evaluated model see the same geometry.
- ``strong``: LMD's student augmentation (Pan et al., arXiv 2502.03238: flips, blur, shift-scale-rotate,
  distortions, colour shift, brightness/contrast, grid dropout). **Interpretation**: the public code uses
  albumentations; these are the torchvision equivalents, with albumentations' default magnitudes for
  shift-scale-rotate (shift 0.0625, scale 0.1, rotate 45 degrees), a perspective warp for the distortions,
  hue/saturation jitter for the colour shift, and our choice of probabilities.
- ``test``: resize the shorter side to ``S`` and centre-crop ``S x S``.

Randomness comes from torch's global generator (torchvision v2 has no generator argument); callers that need
reproducible augmentation seed it around the call (:func:`seeded`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode_image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TransformKind = Literal["weak", "strong", "test", "resize_flip"]
KINDS: tuple[str, ...] = ("weak", "strong", "test", "resize_flip")


def decode_image(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Decode encoded JPEG/PNG bytes to a uint8 RGB tensor ``(3, H, W)`` (grey and RGBA become RGB).

    Raises:
        ValueError: the bytes are empty or not a decodable image.
    """
    if len(data) == 0:
        raise ValueError("image bytes are empty; the dataset version has a row without an encoded image")
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work and are the
            # fastest decoder installed here (libjpeg-turbo), so the per-call warning is noise.
            warnings.simplefilter("ignore", DeprecationWarning)
            return _tv_decode_image(buf, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {e}") from None


class GridDropout(nn.Module):
    """Fill a regular grid of square holes (albumentations' GridDropout) with ``fill``, with probability ``p``.

    The grid unit is drawn from ``unit_range`` pixels, the hole side is ``ratio * unit``, and the grid is shifted
    by a random offset. In :func:`build_transform` it runs on uint8 with the mean colour as fill, which
    normalisation then maps to about 0 (so the holes carry no signal, as RandomErasing's zeros after Normalize).
    """

    def __init__(self, *, ratio: float = 0.3, unit_range: tuple[int, int] = (16, 48), p: float = 0.5,
                 fill: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        super().__init__()
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        if not 2 <= unit_range[0] <= unit_range[1]:
            raise ValueError(f"unit_range must be (lo, hi) with 2 <= lo <= hi, got {unit_range}")
        self.ratio, self.unit_range, self.p, self.fill = ratio, unit_range, p, tuple(fill)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        h, w = img.shape[-2:]
        unit = int(torch.randint(self.unit_range[0], self.unit_range[1] + 1, ()))
        hole = max(1, int(unit * self.ratio))
        oy, ox = (int(v) for v in torch.randint(0, unit, (2,)))
        rows = ((torch.arange(h) + oy) % unit) < hole  # (H,)
        cols = ((torch.arange(w) + ox) % unit) < hole  # (W,)
        mask = rows[:, None] & cols[None, :]  # (H, W)
        fill = torch.tensor(self.fill, dtype=img.dtype).view(-1, 1, 1)  # (C, 1, 1)
        return torch.where(mask, fill, img)


def build_transform(
    kind: str,
    image_size: int,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalize: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``kind`` transform: uint8 ``(3, H, W)`` tensor or PIL image -> float32 ``(3, image_size, image_size)``.

    With ``normalize=False`` it stops before the float conversion and returns uint8 ``(3, S, S)``;
    :func:`normalize_images` then gives exactly the float32 result of the full transform (the same two ops), so
    the uint8 part can run where images are cheap to move and the normalisation where they are consumed.

    Raises:
        ValueError: unknown ``kind`` or ``image_size < 8``.
    """
    if kind not in KINDS:
        raise ValueError(f"transform kind {kind!r} is not valid; choose one of {', '.join(KINDS)}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    s = image_size
    ops: list[nn.Module] = [v2.ToImage()]
    if kind == "test":
        ops += [v2.Resize(s, antialias=True), v2.CenterCrop(s)]
    elif kind == "resize_flip":
        ops += [v2.Resize(s, antialias=True), v2.CenterCrop(s), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    elif kind == "weak":
        ops += [v2.RandomResizedCrop(s, scale=(0.6, 1.0), antialias=True),
                v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    else:
        unit = (max(2, s // 14), max(2, s // 5))  # 16-44 px at 224, scaled with the image
        ops += [
            v2.RandomResizedCrop(s, scale=(0.6, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            # shift-scale-rotate, albumentations' default magnitudes
            v2.RandomApply([v2.RandomAffine(degrees=45, translate=(0.0625, 0.0625), scale=(0.9, 1.1))], p=0.5),
            # optical / grid distortions; a perspective warp, since ElasticTransform costs ~35 ms per 224 px image
            v2.RandomPerspective(distortion_scale=0.2, p=0.3),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.3),
            # colour shift + brightness / contrast
            v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)], p=0.8),
            GridDropout(ratio=0.3, unit_range=unit, p=0.5, fill=[round(255 * m) for m in mean]),
        ]
    ops.append(v2.ToPureTensor())
    if normalize:
        ops += [_Normalize(mean, std)]
    return v2.Compose(ops)


def normalize_images(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 images ``(..., 3, H, W)`` -> float32 ``(x / 255 - mean) / std``, the last step of every transform.

    Computed as ``x * (1 / (255 std)) + (-mean / std)`` in place on one new float32 tensor (equal to the textbook
    form to ~1e-7; memory traffic, not arithmetic, is the cost here), on the images' device: an engine can move
    uint8 batches to the GPU and normalise there.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize_images takes uint8 images, got {images.dtype}")
    if images.ndim < 3 or images.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"images must be (..., {len(mean)}, H, W) with one mean/std per channel, got shape "
                         f"{tuple(images.shape)}, {len(mean)} means, {len(std)} stds")
    m = torch.tensor(mean, dtype=torch.float64)
    sd = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * sd)).to(torch.float32).view(-1, 1, 1).to(images.device)  # (C, 1, 1)
    shift = (-m / sd).to(torch.float32).view(-1, 1, 1).to(images.device)  # (C, 1, 1)
    return images.to(torch.float32).mul_(scale).add_(shift)


class _Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return normalize_images(img, self.mean, self.std)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the enclosed transforms with torch's CPU generator seeded to ``seed``; restore it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
