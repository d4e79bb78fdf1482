"""Reliability through the entry scripts, as a user meets it: bad input, damaged data, refused and failed runs.

Every case runs ``pipelines/two_stage.py`` / ``prepare_data.py`` in a subprocess (its own local Ray where it
gets that far) and checks the exit code, that stderr ends in exactly one ``error:`` line, how long it took to
fail, and what was (not) written. The data is the embedded digits at smoke size, or a tiny label table.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]
SMOKE = ["--smoke-test", "train.num_workers=1", "train.cpus_per_worker=0.5", "train.data_cpus=0.5",
         "train.progress_every_s=0"]
SECRET_KEY_ID = "AKIALTCORETESTKEY0042"
SECRET = "ltcore-secret-value-not-for-files-0042"


def _cli(script: str, *args: str, cwd: Path, timeout: int = 400) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)
    return proc, time.monotonic() - t0


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The single ``error:`` line a failed command ends with (no traceback of ltcore's before it)."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("error: ")[-1]
    return lines[-1]


def _paths(tmp_path: Path) -> list[str]:
    return [f"train.storage={tmp_path / 'store'}", f"data.output={tmp_path / 'datasets'}"]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _table_source(root: Path, labels: dict[str, int], *, corrupt: str = "") -> list[str]:
    """A label table ``meta.csv`` + JPEGs; returns the data.source overrides."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for label, n in labels.items():
        for i in range(n):
            image_id = f"{label}{i:02d}"
            rows.append({"image_id": image_id, "dx": label})
            data = b"not a jpeg" if image_id == corrupt else _jpeg(rng)
            (root / "images" / f"{image_id}.jpg").write_bytes(data)
    pd.DataFrame(rows).to_csv(root / "meta.csv", index=False)
    return ["data.source.kind=table", f"data.source.table={root / 'meta.csv'}",
            f"data.source.image_root={root / 'images'}", "data.source.label_column=dx", "data.name=toy",
            "data.image_size=16", "model.backbone=small_cnn", "stage1.method=ce"]


# ---------------------------------------------------------------------------------------------------------------
# 1, 3, 6: a finished run: secrets nowhere in its files; a resume with another config refused before Ray


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("finished")
    proc, _ = _cli("two_stage.py", *SMOKE, *_paths(tmp), "train.run_id=r1", f"storage.s3_access_key={SECRET_KEY_ID}",
                   f"storage.s3_secret_key={SECRET}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


def test_secrets_are_in_no_output(finished_run):
    tmp, proc = finished_run
    run = tmp / "store" / "runs" / "r1"
    assert (run / "report.json").exists() and (run / "config.yaml").exists()
    recorded = yaml.safe_load((run / "config.yaml").read_text())["storage"]
    assert recorded["s3_access_key"] == recorded["s3_secret_key"] == "<redacted>"
    files = _files(tmp / "store") + _files(tmp / "datasets")
    assert len(files) > 5  # config, run.json, report, plots, checkpoints, shards
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data and SECRET_KEY_ID.encode() not in data, path
    assert SECRET not in proc.stdout + proc.stderr and SECRET_KEY_ID not in proc.stdout + proc.stderr


def test_a_run_prints_ltcores_lines_once_and_not_rays_info_lines(finished_run):
    """The console of a run: ltcore's progress and the table, each line once; Ray's INFO lines (a Train report per
    worker and epoch, Ray Data's per-execution lines) and its progress-bar notice stay in Ray's log files."""
    _tmp, proc = finished_run
    out = proc.stdout + proc.stderr
    for noise in ("Reporting training result", "execution finished", "Progress bars disabled",
                  "exclude_resources"):
        assert noise not in out, f"{noise!r} printed:\n{out[-3000:]}"
    ours = [ln for ln in proc.stdout.splitlines() if ln.startswith(("[stage1]", "[stage2]", "[data]", "run "))]
    assert any(ln.startswith("[stage1] epoch 1/") for ln in ours) and len(ours) == len(set(ours)), ours
    assert re.search(r"^stage2 \(\w+\) test ", proc.stdout, flags=re.M) and "report: " in proc.stdout


@pytest.mark.parametrize(("override", "named"), [
    ("stage1.epochs=2", "stage1.epochs (1 -> 2)"),  # before: stage 2's old checkpoint reported as the final model
    ("model.backbone=resnet18", "model.backbone ('small_cnn' -> 'resnet18')"),  # before: tracebacks after a retry
])
def test_resume_with_another_config_is_refused_before_ray(finished_run, override, named):
    tmp, _ = finished_run
    cfg_file = tmp / "store" / "runs" / "r1" / "config.yaml"
    before = cfg_file.read_bytes()
    proc, took = _cli("two_stage.py", *SMOKE, *_paths(tmp), "train.run_id=r1", override, cwd=tmp)
    line = _one_error_line(proc)
    assert "run r1 was started with another config" in line and named in line, line
    assert "another train.run_id" in line
    assert "Ray" not in proc.stdout + proc.stderr.replace(line, "")  # refused before Ray started
    assert cfg_file.read_bytes() == before  # the run's recorded config is never overwritten
    assert took < 60, took


# ---------------------------------------------------------------------------------------------------------------
# 2: a typo'd label, an empty ImageFolder class


@pytest.mark.parametrize(("script", "flag"), [("two_stage.py", "--smoke-test"), ("retrain.py", "--smoke-test"),
                                              ("prepare_data.py", "--quiet")])
def test_overrides_on_both_sides_of_a_flag(tmp_path, script, flag):
    # As a cluster entrypoint plus local settings reads: `retrain.py --config X a=b --smoke-test c=d`. All of the
    # overrides reach the config (the misspelt key after the flag is named), none is refused by the parser.
    proc, _ = _cli(script, *_paths(tmp_path), flag, "stage1.epochz=1", cwd=tmp_path, timeout=120)
    line = _one_error_line(proc)
    assert "stage1.epochz" in line and "unrecognized arguments" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("script", ["prepare_data.py", "two_stage.py"])
def test_typo_label_is_not_a_new_class(tmp_path, script):
    overrides = _table_source(tmp_path / "src", {"nv": 12, "mel": 8, "df": 5, "mell": 1})
    proc, took = _cli(script, *overrides, *_paths(tmp_path), cwd=tmp_path)
    line = _one_error_line(proc)
    assert "class 'mell' has 1 image(s) (id 'mell00')" in line and "data.min_class_images" in line, line
    assert not _files(tmp_path / "datasets") and not _files(tmp_path / "store")
    assert took < 60, took


def test_empty_imagefolder_class_is_an_error(tmp_path):
    rng = np.random.default_rng(0)
    for c, n in (("a", 6), ("b", 5)):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "src" / c / f"{i}.jpg").write_bytes(_jpeg(rng))
    (tmp_path / "src" / "c").mkdir()  # a class folder whose images were not copied
    proc, _ = _cli("prepare_data.py", "source.kind=imagefolder", f"source.image_root={tmp_path / 'src'}",
                   f"output={tmp_path / 'datasets'}", cwd=tmp_path)
    assert "class folder 'c' holds no images" in _one_error_line(proc)
    assert not _files(tmp_path / "datasets")


# ---------------------------------------------------------------------------------------------------------------
# 4: storage checked before prepare and Ray


def test_missing_bucket_fails_before_prepare(tmp_path, s3_server):
    proc, took = _cli("two_stage.py", *SMOKE, "train.storage=s3://no-such-bucket-ltcore/runs",
                      f"data.output={tmp_path / 'datasets'}", cwd=tmp_path)
    line = _one_error_line(proc)
    assert "bucket 'no-such-bucket-ltcore'" in line and "does not exist" in line, line
    assert not (tmp_path / "datasets").exists()  # the run storage is checked before a dataset is prepared
    assert took < 60, took


def test_unwritable_run_storage_fails_before_prepare(tmp_path):
    (tmp_path / "store").write_text("a file where the run storage should be")
    proc, _ = _cli("two_stage.py", *SMOKE, *_paths(tmp_path), cwd=tmp_path)
    assert "is a file, not a folder" in _one_error_line(proc)
    assert not (tmp_path / "datasets").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5, 7, 8: damaged dataset versions, a run that fails inside Ray, what a failed prepare leaves


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("prepared")
    proc, _ = _cli("prepare_data.py", "--config", str(REPO / "ltcore" / "configs" / "demo.yaml"),
                   "rows_per_shard=100", f"output={tmp / 'datasets'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc.stdout.strip().splitlines()[-1].removeprefix("dataset: ")


def test_missing_shard_is_caught_and_prepare_rebuilds_it(prepared, tmp_path):
    tmp, manifest_uri = prepared
    manifest = json.loads(Path(manifest_uri).read_text())
    shard = Path(manifest["shards"]["train"][1])
    good = shard.read_bytes()
    shard.unlink()
    proc, took = _cli("two_stage.py", *SMOKE, f"dataset={manifest_uri}", f"train.storage={tmp_path / 'store'}",
                      cwd=tmp_path)
    line = _one_error_line(proc)
    assert "is damaged" in line and f"{shard} is missing" in line, line
    assert took < 60 and not (tmp_path / "store").exists()
    # prepare finds the version damaged and rebuilds it: the same version, the same shard bytes
    proc, _ = _cli("prepare_data.py", "--config", str(REPO / "ltcore" / "configs" / "demo.yaml"),
                   "rows_per_shard=100", f"output={tmp / 'datasets'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"dataset: {manifest_uri}"
    assert "rebuilding it" in proc.stdout
    assert shard.read_bytes() == good


def test_failure_inside_ray_is_one_line_with_log_and_rerun_command(prepared, tmp_path):
    _, manifest_uri = prepared
    # A shard damaged in place (same size, so the cheap check passes): the workers fail reading it.
    copy = tmp_path / "version"
    version = Path(manifest_uri).parent
    manifest = json.loads(Path(manifest_uri).read_text())
    manifest["shards"] = {s: [str(copy / Path(u).relative_to(version)) for u in us] for s, us in
                          manifest["shards"].items()}
    manifest["shard_sizes"] = {str(copy / Path(u).relative_to(version)): n for u, n in
                               manifest["shard_sizes"].items()}
    for split, uris in manifest["shards"].items():
        for u in uris:
            Path(u).parent.mkdir(parents=True, exist_ok=True)
            data = (version / Path(u).relative_to(copy)).read_bytes()
            Path(u).write_bytes(b"\0" * len(data) if split == "train" else data)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc, _ = _cli("two_stage.py", *SMOKE, f"dataset={copy / 'manifest.json'}", f"train.storage={tmp_path / 'store'}",
                   "train.run_id=broken", "train.max_failures=0", cwd=tmp_path)
    line = _one_error_line(proc, code=1)
    log = tmp_path / "store" / "runs" / "broken" / "error.log"
    assert "run broken failed in stage 1" in line and f"traceback in {log}" in line, line
    assert "train.run_id=broken" in line  # the command that resumes it
    assert "Traceback" in log.read_text()
    assert not (tmp_path / "store" / "runs" / "broken" / "report.json").exists()

    # The data repaired, the plain command (no run id) continues the unfinished run of this config and says so.
    for uris in manifest["shards"].values():
        for u in uris:
            Path(u).write_bytes((version / Path(u).relative_to(copy)).read_bytes())
    proc, _ = _cli("two_stage.py", *SMOKE, f"dataset={copy / 'manifest.json'}", f"train.storage={tmp_path / 'store'}",
                   "train.max_failures=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run broken: resuming it: the latest unfinished run of this config" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "store" / "runs" / "broken" / "report.json").exists()
    assert [p.name for p in (tmp_path / "store" / "runs").iterdir()] == ["broken"]  # no new run was started


def test_failed_decode_leaves_no_dataset_folder(tmp_path):
    overrides = _table_source(tmp_path / "src", {"a": 6, "b": 5}, corrupt="b02")
    proc, _ = _cli("prepare_data.py", *[o for o in overrides if o.startswith("data.")],
                   f"data.output={tmp_path / 'datasets'}", cwd=tmp_path)
    assert "cannot be decoded" in _one_error_line(proc)
    assert not (tmp_path / "datasets" / "toy").exists()  # no empty version or dataset folders


# ---------------------------------------------------------------------------------------------------------------
# 9: a training run in ltcore's own local Ray while another Ray head runs on the machine. Ray Train's
# placement-group cleaner asks the state API whether the run's controller is alive; without an address it asks
# the cluster `ray start` recorded last (/tmp/ray/ray_current_cluster), which does not know the controller and
# answers "dead": the live run's placement group was removed and its workers killed (WorkerGroupError).


@pytest.mark.slow
def test_run_beside_another_ray_head_is_not_torn_down(ray_head, tmp_path):
    _, _env = ray_head  # `ray start --head` has recorded itself as the machine's latest cluster
    proc, _took = _cli("two_stage.py", "--smoke-test", "train.num_workers=1", "train.cpus_per_worker=0.5",
                      "train.data_cpus=0.5", "stage1.epochs=2", "train.max_steps_per_epoch=10",
                      "train.max_failures=0", *_paths(tmp_path), "train.run_id=beside", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (tmp_path / "store" / "runs" / "beside" / "report.json").exists()
