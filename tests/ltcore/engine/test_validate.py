"""Bad configs fail with one line naming the key, before any Ray work starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ltcore.config import ConfigError, load_config
from ltcore.engine.pipeline import validate

REPO = Path(__file__).resolve().parents[3]
DEMO = str(REPO / "pipelines" / "configs" / "demo.yaml")
pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage1.method=crossentropy", r"stage1.method: 'crossentropy' is not valid; choose one of .*\bce\b"),
        ("stage2.method=platt", r"stage2.method: 'platt' is not valid; choose one of .*\bcrt\b"),
        ("model.backbone=resnet9000", r"model.backbone: 'resnet9000' is neither an ltcore backbone"),
        ("stage1.epochs=0", r"stage1.epochs must be >= 1"),
        ("train.num_workers=0", r"train.num_workers must be >= 1"),
        ("train.torch_threads=-1", r"train.torch_threads must be >= 0"),
        ("train.progress_every_s=-5", r"train.progress_every_s must be >= 0"),
    ],
)
def test_validate_rejects(override, message):
    cfg = load_config(DEMO, [override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_validate_accepts_every_shipped_config():
    for path in sorted((REPO / "pipelines" / "configs").glob("*.yaml")):
        if path.name == "ham10000_base.yaml" or path.name == "ham10000.yaml":
            continue  # bases, not runnable on their own
        validate(load_config(str(path)))


def test_two_stage_cli_bad_config_is_one_line_and_starts_no_ray(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "two_stage.py"), "stage1.method=nope",
                           f"train.storage={tmp_path / 'store'}"], capture_output=True, text=True, timeout=100,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("error: stage1.method: 'nope' is not valid"), proc.stderr
    assert not (tmp_path / "store").exists()  # nothing written


def test_progress_lines_are_rate_limited(capsys, monkeypatch):
    from ltcore.engine import loops

    clock = iter([0.0, 10.0, 30.0, 70.0, 71.0, 200.0, 400.0])
    monkeypatch.setattr(loops.time, "perf_counter", lambda: next(clock))
    p = loops._Progress("[stage1] epoch 1/2", every_s=60.0)  # starts at t=0
    for _ in range(4):  # t = 10, 30, 70, 71
        p.step(64, 2.0)
    lines = capsys.readouterr().out.splitlines()
    # one line: at t=70 (the first step 60 s or more after the start), none at 71
    assert lines == ["[stage1] epoch 1/2 step 3: 192 images on this worker, 3 img/s, mean loss 2.0000"]
    off = loops._Progress("[stage1] epoch 1/2", every_s=0.0)  # t = 200
    off.step(64, 1.0)
    assert capsys.readouterr().out == ""
