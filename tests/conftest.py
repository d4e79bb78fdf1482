"""Shared fixtures: one Ray instance for the whole session, a real S3-compatible server, HAM10000 location."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HAM10000 = SHARED / "data" / "ham10000"

# Keep torch/BLAS from oversubscribing the 2 CI cores when Ray workers run beside the test process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ham10000_dir() -> Path:
    if not (HAM10000 / "HAM10000_metadata.csv").exists():
        pytest.skip(f"HAM10000 not found at {HAM10000}: these tests need ../shared/data/ham10000 beside the repo")
    return HAM10000


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One Ray (2 CPUs) shared by every Ray test; started on first use.

    A `ray start --head` of its own with free ports and its own temp root, joined with ``ray.init``: a local
    ``ray.init`` would take Ray's fixed default ports (the dashboard agent's 52365), and the entry scripts that
    tests run in subprocesses start local Rays of their own while this one is up; the temp root keeps other Ray
    heads on the machine from answering for this one (see ``ltcore.raystart``).
    """
    ray = pytest.importorskip("ray")
    head = None
    if not ray.is_initialized():
        import tempfile

        root = tempfile.mkdtemp(prefix="ltray-", dir="/tmp")
        gcs, agent_http, agent_grpc, metrics, rt_agent = (_free_port() for _ in range(5))
        # No token: this test process imported Ray before it could set one (Ray reads the auth mode at import).
        env = {**os.environ, "RAY_TMPDIR": root, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        exe = str(Path(sys.executable).with_name("ray"))
        cmd = [exe if Path(exe).exists() else "ray", "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
               f"--temp-dir={root}/ray", "--include-dashboard=false", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}"]
        log = open(Path(root) / "head.log", "w")  # noqa: SIM115 - written by the head until teardown
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray head exited: {(Path(root) / 'head.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", gcs), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the test session's ray head did not start within 180 s") from None
                time.sleep(0.5)
        for attempt in range(60):  # the head's raylet registers a little after the GCS answers
            try:
                ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False, configure_logging=False)
                break
            except (ConnectionError, RuntimeError):
                if attempt == 59:
                    raise
                time.sleep(1)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()
    if head is not None:
        import signal

        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-compatible HTTP server (moto_server) on 127.0.0.1; yields endpoint + credentials.

    Tests talk to it over HTTP with s3fs and pyarrow exactly as with AWS. It is a separate process,
    started here and stopped at the end of the session.
    """
    # The venv's own moto first: an older moto_server elsewhere on PATH fails pyarrow's multipart uploads.
    exe = str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        exe = shutil.which("moto_server") or exe
    if not Path(exe).exists():
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto_server exited at start") from None
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start within 30 s")
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"endpoint_url": endpoint, **env}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def s3_bucket(s3_server: dict[str, str]) -> str:
    """A fresh, empty bucket on the test S3 server; returns ``s3://<bucket>``."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    name = f"lt-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    return f"s3://{name}"
