"""`ray job submit` against a real local Ray head (token auth), running the two-stage smoke test."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


@pytest.fixture()
def ray_head(tmp_path):
    """`ray start --head --block` in its own process group with token auth; stopped at the end."""
    gcs, dash, agent_http, agent_grpc, metrics, rt_agent = (_free_port() for _ in range(6))
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
    })
    env.pop("RAY_ADDRESS", None)
    cmd = [_ray_bin(), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
           # Fixed default ports would clash with any other Ray on the machine (the session fixture's).
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}"]
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - the head process writes to it until teardown
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited: {(tmp_path / 'head.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", dash), timeout=0.5):
                break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("ray head's dashboard did not come up within 120 s")
    try:
        yield address, env
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def test_ray_job_submit_smoke(ray_head, tmp_path):
    address, env = ray_head
    storage = tmp_path / "runs"
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": [".venv", ".git", "ltcore-runs", "benchmarks/results", "**/__pycache__"],
        "env_vars": {"OMP_NUM_THREADS": "1"},
    }
    cmd = [_ray_bin(), "job", "submit", f"--address={address}", f"--runtime-env-json={json.dumps(runtime_env)}",
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
    status = subprocess.run([_ray_bin(), "job", "status", f"--address={address}", job_id.group(0)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    report_uri = re.findall(r"^report: (\S+)$", logs, flags=re.M)
    assert report_uri, logs[-2000:]
    report = json.loads(Path(report_uri[-1]).read_text())
    assert report["metrics"]["test"]["accuracy"] is not None
    assert set(report["stages"]) == {"stage1", "stage2"}
