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
    # the toy manifest has no shards to decode: the streams' specs are what is checked, not the decoded cache
    cfg = load_config(None, ["train.seed=7", "stage1.epochs=5", "train.cache_decoded=no", *overrides])
    out = trainer.stage1_datasets(cfg, "mem://manifest.json", _manifest(), clock=None)  # type: ignore[arg-type]
    assert set(out) == {*expected, "val", "test"}
    for name, (q, progressive, seed) in expected.items():
        spec = out[name]
        assert (spec.split, spec.q, spec.progressive, spec.seed, spec.total_epochs) == ("train", q, progressive,
                                                                                         seed, 5), name
    assert out["val"].q is None and not out["val"].shuffle


def test_train_workers_get_the_malloc_settings(ray_session, tmp_path, monkeypatch):
    """A Train worker started with ltcore's run config sees WORKER_MALLOC_ENV; a variable the driver sets keeps
    the driver's value."""
    import json
    import os

    import ray.train
    from ray.train.torch import TorchTrainer

    from ltcore.engine.trainer import WORKER_MALLOC_ENV, run_config

    def write_env(config: dict) -> None:  # the worker's view of the variables, written where the test reads it
        with open(config["out"], "w") as f:
            json.dump({k: os.environ.get(k, "unset") for k in WORKER_MALLOC_ENV}, f)

    def worker_env(overrides: list[str], name: str) -> dict[str, str]:
        cfg = load_config(None, [f"train.storage={tmp_path}", *overrides])
        out = tmp_path / f"{name}.json"
        TorchTrainer(write_env, train_loop_config={"out": str(out)},
                     scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                     run_config=run_config(cfg, str(tmp_path / name), name)).fit()
        return json.loads(out.read_text())

    monkeypatch.setenv("MALLOC_TOP_PAD_", "12345")
    assert worker_env([], "tuned") == {**WORKER_MALLOC_ENV, "MALLOC_TOP_PAD_": "12345"}


def test_tune_malloc_off_sets_no_worker_variables():
    from ltcore.engine.trainer import worker_env

    assert worker_env(load_config(None, ["train.tune_malloc=false"])) == {}
