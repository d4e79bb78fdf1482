"""The cluster commands as users meet them: the README's `ray job submit` examples, run as written against a local
head, and the KubeRay RayJob/RayCronJob entrypoints, run locally with ``--smoke-test``.

Both are slow (each a full smoke run: 2-4 minutes here). The README's block is taken from the section
"On a cluster": its ``export`` lines name the variables the commands use (the head's address and the storage), the
test sets them to the local head and a bucket on the S3 test server and runs every ``ray job submit`` command of the
block through bash, unchanged.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
IMAGE_ROOT = "/home/ray/ltcore"


def readme_cluster_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's cluster section has one bash block"
    return blocks[0]


def submit_commands(block: str) -> list[str]:
    commands, current = [], ""
    for line in block.splitlines():
        current = f"{current}\n{line}" if current else line
        if line.rstrip().endswith("\\"):
            continue
        if current.startswith("ray job submit"):
            commands.append(current)
        current = ""
    return commands


def test_readme_examples_are_found() -> None:
    block = readme_cluster_block()
    assert sorted(re.findall(r"^export (\w+)=", block, flags=re.M)) == ["LTCORE_STORE", "RAY_ADDRESS"]
    assert len(submit_commands(block)) == 2


@pytest.mark.timeout(1500)
def test_readme_submit_examples_run_as_written(two_node_cluster, s3_bucket: str, s3_fs) -> None:
    env = {**two_node_cluster.env, "RAY_ADDRESS": two_node_cluster.address, "LTCORE_STORE": f"{s3_bucket}/ltcore"}
    for command in submit_commands(readme_cluster_block()):
        out = two_node_cluster.shell(command, env, timeout=900)
        logs = out.stdout + out.stderr
        assert out.returncode == 0, f"{command}\n{logs[-4000:]}"
        report = re.findall(rf"^report: ({re.escape(s3_bucket)}/ltcore/runs/\S+/report\.json)$", logs, flags=re.M)
        assert report and s3_fs.exists(report[-1]), logs[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# KubeRay entrypoints


HAM_CLASSES = {"nv": 120, "mel": 40, "bkl": 40, "bcc": 30, "akiec": 25, "vasc": 20, "df": 20}


def upload_ham_like(s3_fs, root: str) -> None:
    """A small HAM10000-shaped set (metadata table + JPEGs) under ``root``: what the cluster config reads."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["lesion_id,image_id,dx"]
    for c, (name, n) in enumerate(HAM_CLASSES.items()):
        for i in range(n):
            image_id = f"ISIC_{c}{i:05d}"
            rows.append(f"HAM_{c}{i // 2:05d},{image_id},{name}")  # two images per lesion
            pixels = np.clip(rng.normal(40 + 30 * c, 20, (45, 60, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG")
            s3_fs.pipe(f"{root}/images/{image_id}.jpg", buf.getvalue())
    s3_fs.pipe(f"{root}/HAM10000_metadata.csv", ("\n".join(rows) + "\n").encode())


def entrypoint(manifest: str, kind: str) -> list[str]:
    for doc in yaml.safe_load_all((REPO / "cluster" / "kuberay" / manifest).read_text()):
        if doc["kind"] == kind:
            spec = doc["spec"]["jobTemplate"] if kind == "RayCronJob" else doc["spec"]
            # the image holds the repository at IMAGE_ROOT; here it is this checkout
            return [REPO.as_posix() + a.removeprefix(IMAGE_ROOT) if a.startswith(IMAGE_ROOT) else a
                    for a in shlex.split(spec["entrypoint"])]
    raise AssertionError(f"no {kind} in {manifest}")


@pytest.fixture()
def ham_on_s3(s3_server, s3_fs) -> None:
    """The cluster config's bucket ``ltcore`` with the data where the config expects it."""
    if not s3_fs.exists("ltcore"):
        s3_fs.mkdir("ltcore")
    if not s3_fs.exists("ltcore/data/ham10000/HAM10000_metadata.csv"):
        upload_ham_like(s3_fs, "ltcore/data/ham10000")


# On this 2-core machine: 2 CPU workers on a local Ray instead of the cluster's 4 GPU workers.
LOCAL_SIZE = ("train.num_workers=2", "train.cpus_per_worker=0.5", "train.data_cpus=0.5")


@pytest.mark.timeout(1200)
@pytest.mark.parametrize(("manifest", "kind"), [("rayjob.yaml", "RayJob"), ("raycronjob.yaml", "RayCronJob")])
def test_kuberay_entrypoint_runs_locally_with_smoke_test(ham_on_s3, s3_server, tmp_path: Path, manifest: str,
                                                         kind: str) -> None:
    argv = entrypoint(manifest, kind)
    assert argv[0] == "python"
    if not Path(argv[1]).exists():
        pytest.skip(f"{Path(argv[1]).relative_to(REPO)} is not in this checkout yet")
    env = {**os.environ, **{k: v for k, v in s3_server.items() if k.startswith("AWS_")}, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    # the cluster's MLflow tracking server (retrain.py's registry) is a local SQLite store here
    argv = [f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}" if a.startswith("tracking.mlflow_uri=") else a
            for a in argv]
    if kind == "RayCronJob":  # retrain.py needs a registry, which object storage cannot hold: the manifest names one
        assert any(a.startswith("tracking.mlflow_uri=sqlite:///") for a in argv), argv
    out = subprocess.run([sys.executable, *argv[1:], "--smoke-test", *LOCAL_SIZE], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1100)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-4000:]
    if kind == "RayJob":
        assert re.search(r"^report: s3://ltcore/runs/\S+/report\.json$", logs, flags=re.M), logs[-2000:]
