"""`ray job submit` against a real local Ray head (token auth), running the two-stage smoke test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
RAY = str(Path(sys.executable).with_name("ray"))  # the venv's ray CLI (the `ray_head` fixture: conftest.py)


def test_ray_job_submit_smoke(ray_head, tmp_path):
    address, env = ray_head
    storage = tmp_path / "runs"
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": [".venv", ".git", "ltcore-runs", "benchmarks/results", "**/__pycache__"],
        "env_vars": {"OMP_NUM_THREADS": "1"},
    }
    cmd = [RAY, "job", "submit", f"--address={address}", f"--runtime-env-json={json.dumps(runtime_env)}",
           "--", "python", "pipelines/two_stage.py", "--smoke-test", f"train.storage={storage}",
           f"data.output={tmp_path / 'datasets'}", "train.num_workers=1"]
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
        logs = out.stdout + out.stderr
        # The head's dashboard answers before its job agent is up; that refusal is retryable, nothing ran.
        if out.returncode == 0 or "No available agent" not in logs or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, logs[-4000:]
    job_id = re.search(r"raysubmit_\w+", logs)
    assert job_id, logs[-2000:]
    status = subprocess.run([RAY, "job", "status", f"--address={address}", job_id.group(0)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    report_uri = re.findall(r"^report: (\S+)$", logs, flags=re.M)
    assert report_uri, logs[-2000:]
    report = json.loads(Path(report_uri[-1]).read_text())
    assert report["metrics"]["test"]["accuracy"] is not None
    assert set(report["stages"]) == {"stage1", "stage2"}
