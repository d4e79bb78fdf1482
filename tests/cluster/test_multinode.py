"""Two-stage runs on a real 2-node Ray cluster (``two_node_cluster``), submitted with ``ray job submit``.

- Node-local storage on 2 nodes is refused once the driver has joined the cluster and before training, with one
  line, and nothing of the run is recorded (slow: 4.5 minutes here with the cluster start, on a busy machine; the
  same message without a cluster is in test_placement.py, in ``make test``).
- The smoke job with 2 workers placed one per node (``train.placement_strategy=STRICT_SPREAD``), storage on the S3
  test server: it finishes, the report lists the workers of each stage and they ran on the two nodes; the same
  command again (same run id) resumes the finished run instead of training again (slow: 4-6 minutes here).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.s3]

RUNTIME_ENV = "cluster/runtime_env.yaml"
TWO_WORKERS = ("train.num_workers=2", "train.cpus_per_worker=0.5", "train.data_cpus=0.5")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_node_local_storage_refused_on_two_nodes(two_node_cluster, tmp_path: Path) -> None:
    runs, datasets = tmp_path / "runs", tmp_path / "datasets"
    out = two_node_cluster.submit(f"--runtime-env={RUNTIME_ENV}", "--", "python", "pipelines/two_stage.py",
                                  "--smoke-test", f"train.storage={runs}", f"data.output={datasets}", *TWO_WORKERS,
                                  timeout=540)
    logs = out.stdout + out.stderr
    assert out.returncode != 0, logs[-3000:]
    # `ray job submit` prints the job's log, then its last lines again when the job fails: one line, shown twice
    errors = sorted({ln for ln in logs.splitlines() if ln.startswith("error: ")})
    assert len(errors) == 1, logs[-3000:]
    assert re.fullmatch(rf"error: train\.storage '{re.escape(str(runs))}' and data\.output '{re.escape(str(datasets))}'"
                        r" are paths on one node's disk, but the Ray cluster has 2 nodes: .*use shared storage: an "
                        r"s3:// URI.*storage\.shared_paths", errors[0]), errors[0]
    assert "[stage1]" not in logs  # refused before training
    assert not list(runs.glob("runs/*/config.yaml")), "a refused run must not be recorded"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_stage_on_two_nodes_one_worker_each_and_resume(two_node_cluster, s3_bucket: str, s3_fs) -> None:
    head, second = two_node_cluster.node_with("node_head"), two_node_cluster.node_with("node_second")
    run_id = f"two-nodes-{uuid.uuid4().hex[:6]}"
    args = (f"--runtime-env={RUNTIME_ENV}", "--", "python", "pipelines/two_stage.py", "--smoke-test",
            f"train.storage={s3_bucket}/store", f"data.output={s3_bucket}/datasets", *TWO_WORKERS,
            "train.placement_strategy=STRICT_SPREAD", f"train.run_id={run_id}")

    first = two_node_cluster.submit(*args)
    logs = first.stdout + first.stderr
    assert first.returncode == 0, logs[-4000:]
    report_uri = re.findall(r"^report: (s3://\S+)$", logs, flags=re.M)
    assert report_uri == [f"{s3_bucket}/store/runs/{run_id}/report.json"], logs[-2000:]
    report = json.loads(s3_fs.cat(report_uri[0]))
    for stage in ("stage1", "stage2"):
        workers = report["stages"][stage]["last_metrics"]["workers"]
        assert sorted(w["rank"] for w in workers) == [0, 1]
        assert {w["node_id"] for w in workers} == {head, second}, (stage, workers, head, second)
    assert report["metrics"]["test"]["n_samples"] > 0

    again = two_node_cluster.submit(*args)
    logs2 = again.stdout + again.stderr
    assert again.returncode == 0, logs2[-4000:]
    assert f"run {run_id}: resuming it" in logs2
    assert "[stage1] already complete" in logs2 and "[stage2] already complete" in logs2
    assert "[stage1] epoch" not in logs2  # nothing trained again
    resumed = json.loads(s3_fs.cat(report_uri[0]))
    # Re-reporting a finished stage stores its checkpoint again under a new name (Ray Train, which may then drop the
    # old one): the model is the first run's, so its test metrics are the same.
    assert s3_fs.exists(resumed["model"])
    assert resumed["metrics"]["test"] == report["metrics"]["test"]
    assert {w["node_id"] for w in resumed["stages"]["stage1"]["last_metrics"]["workers"]} == {head, second}
