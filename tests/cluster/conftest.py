"""A real 2-node Ray cluster on this machine: `ray start --head` and a second `ray start --address ...`.

Each node is its own raylet with 1 CPU and a custom resource naming it (``node_head``, ``node_second``), so where
the Train workers ran can be checked against the nodes' ids. Token auth as in ``test_submit.py``; every node gets
the S3 test server's endpoint and credentials in its environment, as cluster nodes get theirs from their
environment or instance role. Jobs are submitted with the real ``ray job submit`` from the repository root.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # small: the machine is shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


@dataclass
class Cluster:
    address: str  # the dashboard / job API, what RAY_ADDRESS holds for `ray job submit`
    env: dict[str, str]  # token, S3 endpoint; what a submitting shell has
    logs: Path

    def nodes(self) -> list[dict]:
        """Alive nodes from the dashboard's state API (``node_id``, ``resources_total``, ...); [] while it is not up."""
        url = f"{self.address}/api/v0/nodes?detail=true&limit=100"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = json.load(r)
        except (OSError, ValueError):
            return []
        rows = ((body.get("data") or {}).get("result") or {}).get("result") or []
        return [n for n in rows if n.get("state") == "ALIVE"]

    def node_with(self, resource: str) -> str:
        ids = [n["node_id"] for n in self.nodes() if resource in (n.get("resources_total") or {})]
        assert len(ids) == 1, f"expected one node with {resource}: {self.nodes()}"
        return ids[0]

    def submit(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """`ray job submit --address ... ARGS` from the repository root; retried while the head's job agent is not
        up yet (that refusal runs nothing)."""
        return run_submit([ray_bin(), "job", "submit", f"--address={self.address}", *args], self.env, timeout)

    def shell(self, command: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """A shell command line (a README example) run from the repository root, retried as :meth:`submit`."""
        return run_submit(command, env, timeout)


def run_submit(cmd: list[str] | str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                             shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None)
        logs = out.stdout + out.stderr
        if out.returncode == 0 or "No available agent" not in logs or time.monotonic() > deadline:
            return out
        time.sleep(3)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    f = open(log, "w")  # noqa: SIM115 - the node writes to it until teardown
    return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _node_ports() -> list[str]:
    # Fixed default ports would clash between the two nodes and with any other Ray on the machine.
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def two_node_cluster(s3_server: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Ray head and a second node (1 CPU each; custom resources ``node_head`` / ``node_second``)."""
    logs = tmp_path_factory.mktemp("two-node")
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        # A raylet waits this long for the GCS to confirm its registration; 10 s is too short on a busy 2-core box.
        "RAY_raylet_start_wait_time_s": "120",
        **{k: v for k, v in s3_server.items() if k.startswith("AWS_")},
    })
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    head = _start([ray_bin(), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1",
                   '--resources={"node_head": 1}', "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dash}", *_node_ports()], env, logs / "head.log")
    procs = [head]
    cluster = Cluster(f"http://127.0.0.1:{dash}", env, logs)
    try:
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray head exited: {(logs / 'head.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("ray head's dashboard did not come up within 180 s") from None
                time.sleep(1)
        while not cluster.nodes():  # the head's raylet registered: a second node joining earlier is refused
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head node did not register: {(logs / 'head.log').read_text()[-2000:]}")
            time.sleep(2)
        second = _start([ray_bin(), "start", f"--address=127.0.0.1:{gcs}", "--block", "--num-cpus=1",
                         '--resources={"node_second": 1}', *_node_ports()], env, logs / "second.log")
        procs.append(second)
        deadline = time.monotonic() + 300  # a raylet start took over 2 minutes on the busy 2-core test machine
        while len(cluster.nodes()) < 2:
            if second.poll() is not None:
                raise RuntimeError(f"second node exited: {(logs / 'second.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the second node did not join within 300 s: {cluster.nodes()}")
            time.sleep(2)
        yield cluster
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture()
def s3_fs(s3_server: dict[str, str]):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing",
                             use_listings_cache=False, skip_instance_cache=True)
