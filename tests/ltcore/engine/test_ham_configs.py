"""Every shipped HAM10000 method config runs end to end with ``--smoke-test`` on the real data, 2 Ray Train workers.

``two_stage.py --config ltcore/configs/ham10000_<method>.yaml --smoke-test`` is ``cli.load(path, overrides,
smoke=True)`` then ``run_two_stage``; the tests do the same in-process on the shared 2-CPU Ray, with the data paths
pointed at ``../shared/data/ham10000`` and the outputs at a temporary folder. The smoke settings keep 300 images
(stratified), one epoch of 2 steps per stage. All configs share one prepared version (same data section, so the
second and later runs find it up to date). All are ``slow`` (``make test-all``): each is 1-4 minutes here, and
``make test`` must stay under 20 minutes; every method's smoke run on 2 workers is in ``make test`` through
``test_engine.py::test_method_smoke_two_workers`` (the demo data with the same method settings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
CONFIGS = sorted(p.stem.removeprefix("ham10000_") for p in (REPO / "ltcore" / "configs").glob("ham10000_*.yaml")
                 if p.stem != "ham10000_base")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ham_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ham-configs")


def test_every_method_has_a_config():
    assert {"proco", "metric", "jrcl", "lmd", "spmix", "composed", "ce", "ce_crt"} <= set(CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("method", CONFIGS)
def test_ham_config_smoke_two_workers(ray_session, ham10000_dir: Path, ham_outputs: Path, tmp_path: Path,
                                      method: str, check_report) -> None:
    from ltcore import cli
    from ltcore.engine.pipeline import run_two_stage

    cfg = cli.load(str(REPO / "ltcore" / "configs" / f"ham10000_{method}.yaml"), [
        f"data.source.table={ham10000_dir / 'HAM10000_metadata.csv'}",
        f"data.source.image_root={ham10000_dir / 'images'}",
        f"data.output={ham_outputs / 'datasets'}", f"train.storage={tmp_path / 'store'}",
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.data_cpus=0.5",
    ], smoke=True)
    assert cfg.data.limit == 300 and cfg.stage1.epochs == 1 and cfg.train.max_steps_per_epoch == 2
    report = json.loads(Path(run_two_stage(cfg, log=lambda _: None)).read_text())
    assert report["class_counts"]["train"] and len(report["class_counts"]["train"]) == 7  # HAM10000's classes
    test = report["metrics"]["test"]
    assert test["n_samples"] == sum(report["class_counts"]["test"]) > 0
    check_report(report)
    if cfg.stage2.method != "none":
        assert "stage2" in report["stages"]
