"""Load: a 50,000-image dataset (HAM10000's images repeated under new ids and lesion ids) prepared from and to the
S3 test server through ``pipelines/prepare_data.py``; throughput and the peak memory of the whole process tree
(driver, Ray's processes and workers) are measured and printed, and the peak is bounded."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[3]
COPIES = 5
PEAK_RSS_LIMIT = 12 * 2**30  # CI has 24 GiB; a prepare that holds the dataset in memory would exceed this
pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.fault, pytest.mark.timeout(3600)]


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def test_prepare_50k_images_through_s3(ham10000_dir: Path, s3_bucket: str, tmp_path: Path):
    import s3fs

    meta = pd.read_csv(ham10000_dir / "HAM10000_metadata.csv")
    rows = pd.concat([meta.assign(image_id=[f"r{k}/{i}" for i in meta.image_id],
                                  lesion_id=[f"r{k}-{g}" for g in meta.lesion_id]) for k in range(COPIES)])
    assert len(rows) >= 50_000
    # the images under their new ids: local symlinks, uploaded to the bucket in one batched put
    local = tmp_path / "images"
    for k in range(COPIES):
        (local / f"r{k}").mkdir(parents=True)
        for i in meta.image_id:
            os.symlink(ham10000_dir / "images" / f"{i}.jpg", local / f"r{k}" / f"{i}.jpg")
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], key="testing", secret="testing")
    bucket = s3_bucket.removeprefix("s3://")
    t0 = time.monotonic()
    fs.put(str(local) + "/", f"{bucket}/raw/images/", recursive=True)
    rows.to_csv(tmp_path / "meta.csv", index=False)
    fs.put(str(tmp_path / "meta.csv"), f"{bucket}/raw/meta.csv")
    upload_s = time.monotonic() - t0

    cmd = [sys.executable, str(REPO / "pipelines" / "prepare_data.py"),
           "--config", str(REPO / "ltcore" / "configs" / "ham10000.yaml"), "name=ham50k",
           f"source.table={s3_bucket}/raw/meta.csv", f"source.image_root={s3_bucket}/raw/images",
           f"output={s3_bucket}/datasets", "image_size=64"]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.5)
    out, err = proc.communicate()
    took = time.monotonic() - t0
    assert proc.returncode == 0, err[-3000:]
    manifest_uri = out.strip().splitlines()[-1].removeprefix("dataset: ")
    manifest = json.loads(fs.cat(manifest_uri.removeprefix("s3://")))
    n = sum(sum(c.values()) if isinstance(c, dict) else sum(c) for c in manifest["counts"].values())
    assert n == len(rows)
    print(f"\n50k prepare through S3: {n} images, upload {upload_s:.0f} s, prepare {took:.0f} s "
          f"({n / took:.0f} img/s incl. Ray start-up), peak RSS of the process tree {peak / 2**30:.2f} GiB")
    assert peak < PEAK_RSS_LIMIT, peak
