"""A non-editable install runs: the configs ship as package data and the console scripts start the entry points.

The tests' Python already holds torch, Ray and the other dependencies; a fresh virtual environment would fetch
them again (gigabytes, and torch must not be reinstalled over a cluster's CUDA build), so ``pip install .`` puts
the package alone into a folder (``--no-deps --target``), which goes first on PYTHONPATH, and the console script
runs from a folder outside the repository, where the source tree cannot be imported by accident. Measured: 234 s
on the shared 2-core machine (load average about 10; most of it Ray start-up and the smoke run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ltcore import cli

REPO = Path(__file__).resolve().parents[2]


def test_demo_config_is_package_data():
    demo = Path(cli.DEMO_CONFIG)
    assert demo.is_file() and demo.parent == Path(cli.__file__).parent / "configs"
    assert sorted(p.name for p in demo.parent.glob("*.yaml")) == sorted(
        p.name for p in (REPO / "ltcore" / "configs").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_installed_package_finds_its_demo_config_and_trains(tmp_path):
    # Build from a copy of what the package is made of, so that the checkout gets no build/ or egg-info folders.
    src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    shutil.copytree(REPO / "ltcore", src / "ltcore", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}

    where = subprocess.run([sys.executable, "-c", "import ltcore.cli as c; print(c.__file__); print(c.DEMO_CONFIG)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, check=True)
    module, demo = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(demo) == site / "ltcore" / "configs" / "demo.yaml"
    assert Path(demo).is_file()

    for script in ("ltcore-prepare", "ltcore-evaluate"):
        help_ = subprocess.run([str(site / "bin" / script), "--help"], cwd=elsewhere, env=env, capture_output=True,
                               text=True, timeout=120)
        assert help_.returncode == 0 and "usage:" in help_.stdout, help_.stderr[-2000:]
    train = subprocess.run([str(site / "bin" / "ltcore-train"), "--smoke-test", f"train.storage={tmp_path / 'runs'}",
                            f"data.output={tmp_path / 'datasets'}"], cwd=elsewhere, env=env, capture_output=True,
                           text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    last = train.stdout.strip().splitlines()[-1]
    assert last.startswith("report: ") and Path(last.removeprefix("report: ")).is_file(), train.stdout[-2000:]
    assert (tmp_path / "datasets" / "digits-lt").is_dir()  # the demo config's dataset
