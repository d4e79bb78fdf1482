"""The driver applies the sampling policy: each stage-1 stream's IngestSpec is what stage1_sampling says."""

from __future__ import annotations

import pytest

from ltcore.config import load_config
from ltcore.data.manifest import Manifest

CLASSES = ("a", "b", "c")


def _manifest() -> Manifest:
    counts = {"train": {"a": 6, "b": 3, "c": 1}, "val": dict.fromkeys(CLASSES, 1), "test": dict.fromkeys(CLASSES, 1)}
    return Manifest(name="toy", hash="h0", classes=CLASSES, counts=counts, image_size=16,
                    shards={s: [] for s in counts})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # (q, progressive, seed) per stream; the run's seed is 7
        ([], {"train": (1.0, False, 7)}),
        (["stage1.q=0.5"], {"train": (0.5, False, 7)}),
        (["stage1.progressive=true"], {"train": (1.0, True, 7)}),
        (["stage1.method=metric", "stage1.pk_classes=2"], {"train": (0.0, False, 7)}),
        (["stage1.loss.spmix=true", "stage1.progressive=true"], {"train": (1.0, True, 7), "tail": (0.0, False, 8)}),
    ],
)
def test_stage1_datasets_apply_the_policy(monkeypatch, overrides, expected):
    from ltcore.engine import trainer

    monkeypatch.setattr(trainer, "_dataset", lambda uri, spec, **kw: spec)  # the spec instead of a Ray dataset
    cfg = load_config(None, ["train.seed=7", "stage1.epochs=5", *overrides])
    out = trainer.stage1_datasets(cfg, "mem://manifest.json", _manifest(), clock=None)  # type: ignore[arg-type]
    assert set(out) == {*expected, "val", "test"}
    for name, (q, progressive, seed) in expected.items():
        spec = out[name]
        assert (spec.split, spec.q, spec.progressive, spec.seed, spec.total_epochs) == ("train", q, progressive,
                                                                                         seed, 5), name
    assert out["val"].q is None and not out["val"].shuffle
