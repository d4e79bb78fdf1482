"""Checkpoints from shared storage are loaded with ``weights_only=True``: a pickled object that would run code is
refused, and what ltcore saves (NumPy values included) still loads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ltcore.engine import checkpoint as ckpt


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "ck").mkdir()
    torch.save({"model": {}, "evil": _RunsCode(str(marker))}, tmp_path / "ck" / ckpt.STATE_FILE)
    (tmp_path / "ck" / ckpt.META_FILE).write_text("{}")
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        ckpt.load_dir(str(tmp_path / "ck"))
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        ckpt.load_uri(str(tmp_path / "ck"))
    assert not marker.exists()


def test_numpy_values_are_saved_as_plain_values(tmp_path):
    state = {"model": {"w": torch.ones(2)}, "calibration": {"tau": np.float64(0.7), "w": np.arange(3),
                                                             "steps": [np.int64(4)]}, "betas": (0.9, 0.99)}
    ckpt.save_dir(str(tmp_path), state, {"classes": ["a"]})
    got, meta = ckpt.load_dir(str(tmp_path))
    assert got["calibration"]["tau"] == 0.7 and isinstance(got["calibration"]["tau"], float)
    assert got["calibration"]["w"].tolist() == [0, 1, 2] and got["calibration"]["steps"] == [4]
    assert got["betas"] == (0.9, 0.99) and meta == {"classes": ["a"]}
