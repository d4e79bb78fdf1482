"""Engine test helpers."""

from __future__ import annotations

import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from ltcore.engine.checkpoint import PRED_FILE


@pytest.fixture()
def check_report() -> Callable[[dict], None]:
    return check_report_against_predictions


def check_report_against_predictions(report: dict) -> None:
    """The report's test metrics are those of the final model's saved predictions (recomputed with
    scikit-learn), and the final loss is a finite number (NaN is written as null)."""
    pred = np.load(Path(report["model"]) / PRED_FILE)
    y, p = pred["test_labels"], pred["test_probs"].argmax(1)
    test = report["metrics"]["test"]
    assert test["n_samples"] == len(y) > 0
    assert test["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p), abs=1e-9)
    assert test["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-9)
    loss = report["stages"]["stage1"]["last_metrics"]["train_loss"]
    assert isinstance(loss, float) and math.isfinite(loss), loss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


@pytest.fixture()
def ray_head(tmp_path) -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head --block` in its own process group with token auth; stopped at the end."""
    gcs, dash, agent_http, agent_grpc, metrics, rt_agent = (free_port() for _ in range(6))
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
    })
    env.pop("RAY_ADDRESS", None)
    cmd = [ray_bin(), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
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
