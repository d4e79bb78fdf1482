"""Lifecycle test helpers: digit images as files (an image-folder source that can grow), retrain configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
RETRAIN = REPO / "pipelines" / "retrain.py"
PREDICT = REPO / "pipelines" / "predict.py"
# Five digit classes, long-tailed (head 0 ... tail 4): 155 images.
COUNTS = (70, 40, 22, 13, 10)


def write_digits(root: Path, counts: tuple[int, ...] = COUNTS, offset: int = 0) -> list[str]:
    """Write scikit-learn's digits as 8x8 PNG files ``root/<class>/d<index>.png``: for class k, the images
    ``offset .. offset + counts[k] - 1`` of that digit. Returns the relative paths written."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    written = []
    for k, n in enumerate(counts):
        idx = np.flatnonzero(d.target == k)[offset : offset + n]
        (root / str(k)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            rel = f"{k}/d{int(i):04d}.png"
            Image.fromarray(pixels[i]).convert("RGB").save(root / rel)
            written.append(rel)
    return written


def retrain_overrides(tmp: Path, images: Path) -> list[str]:
    """The demo retrain config on an image folder, tiny: 2 workers of 0.5 CPU, 16 px."""
    return [
        "data.source.kind=imagefolder", f"data.source.image_root={images}", "data.name=digits5",
        f"data.output={tmp / 'datasets'}", f"train.storage={tmp / 'store'}", "data.image_size=16",
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.data_cpus=0.5",
        "stage1.epochs=4", "stage1.batch_size=16", "stage2.epochs=3", "stage2.batch_size=16",
        "train.eval_batch_size=64", "tracking.model_name=digits5",
    ]


# A busy CI machine can take longer than Ray's default to register a fresh local node.
_WAIT = "RAY_raylet_start_wait_time_s"  # Ray's config name, case and all


def subprocess_env() -> dict[str, str]:
    """The environment now (fixtures set the S3 variables), with the longer Ray node wait."""
    return {**os.environ, _WAIT: os.environ.get(_WAIT, "180")}


def run_script(script: Path, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=subprocess_env())


def last_line(proc: subprocess.CompletedProcess) -> str:
    """The script's last line: stdout's (results), or stderr's for errors (Ray's own log lines go to stderr too)."""
    if proc.returncode in (1, 2):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    else:
        lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture()
def registry_client():
    def make(store: Path):
        from mlflow import MlflowClient

        uri = f"sqlite:///{store / 'mlflow.db'}"
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    return make
