"""Checkpoint <-> state dict. One file, ``state.pt``, plus ``meta.json`` that says what made it.

Checkpoints come from shared storage, so loading never unpickles arbitrary objects: ``torch.load(weights_only=True)``
(tensors, containers and plain numbers only). :func:`save_dir` turns NumPy values into those before saving.

``meta`` holds what must match for a checkpoint to be loaded into a model: backbone, class list, head, and
feature dim. Loading a checkpoint made under another config is a one-line error naming the field, not a
shape mismatch deep inside torch.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import torch

from ltcore import storage

STATE_FILE = "state.pt"
META_FILE = "meta.json"
PRED_FILE = "predictions.npz"  # the final step's gathered val/test predictions, beside the weights
# What a model built from config must agree on with a checkpoint to load it.
COMPAT_KEYS = ("backbone", "classes", "head", "feat_dim", "proj_dim", "aux_binary")


class CheckpointError(ValueError):
    pass


def save_dir(directory: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write ``state.pt`` and ``meta.json`` into a local directory (Ray uploads it)."""
    os.makedirs(directory, exist_ok=True)
    torch.save(plain(state), os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def plain(obj: Any) -> Any:
    """``obj`` with NumPy scalars as Python numbers and NumPy arrays as tensors: what ``weights_only`` loads."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def load_dir(directory: str, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory!r} holds no {STATE_FILE}; is it an ltcore checkpoint?")
    state = torch.load(path, map_location=map_location, weights_only=True)
    with open(os.path.join(directory, META_FILE)) as f:
        meta = json.load(f)
    return state, meta


def load_uri(uri: str, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint directory from any URI (local, s3://, ...)."""
    import io

    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, STATE_FILE))), map_location=map_location,
                       weights_only=True)
    meta = storage.read_json(storage.join(uri, META_FILE))
    return state, meta


def read_meta(cp: Any) -> dict[str, Any]:
    """``meta.json`` of a ``ray.train.Checkpoint`` (read through its filesystem; the weights are not fetched)."""
    with cp.filesystem.open_input_stream(f"{cp.path.rstrip('/')}/{META_FILE}") as f:
        return json.loads(f.read().decode("utf-8"))  # type: ignore[no-any-return]


def new_checkpoint_id() -> str:
    """Names one saved state: a checkpoint re-reported by a finished run keeps it, so a later stage can tell
    whether the checkpoint it was built from is still the one it gets."""
    return uuid.uuid4().hex


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], what: str = "checkpoint") -> None:
    for key in COMPAT_KEYS:
        if key in expected and key in meta and meta[key] != expected[key]:
            raise CheckpointError(
                f"{what} was made with {key}={meta[key]!r} but this config has {key}={expected[key]!r}; "
                "use the config it was trained with or start a new run (train.run_id)"
            )
