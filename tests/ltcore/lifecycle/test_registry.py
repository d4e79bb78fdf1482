"""The registry on MLflow's embedded SQLite store (no Ray): versions, tags, the alias compare-and-set, the decision
log and the retrain lock, read back with MLflow's own client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ltcore.config import load_config
from ltcore.lifecycle import registry, tracking

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def client(tmp_path):
    cfg = load_config(None, [f"train.storage={tmp_path / 'store'}", "tracking.mlflow_uri=embedded"])
    assert tracking.tracking_uri(cfg, default_embedded=False) == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    c = tracking.client(cfg)
    return c, cfg


def _run_with_checkpoint(c, cfg, tmp_path: Path, tag: str) -> str:
    ck = tmp_path / f"ck-{tag}"
    ck.mkdir()
    (ck / "state.pt").write_bytes(b"weights " + tag.encode())
    (ck / "meta.json").write_text("{}")
    run = c.create_run(tracking.experiment_id(c, cfg))
    c.log_artifacts(run.info.run_id, str(ck), tracking.CHECKPOINT_ARTIFACT)
    return str(run.info.run_id)


def test_versions_alias_and_decisions(client, tmp_path):
    c, cfg = client
    assert registry.alias_version(c, "m", "champion") is None  # no such model yet
    v1 = registry.register(c, "m", _run_with_checkpoint(c, cfg, tmp_path, "a"), {"ltcore.dataset_hash": "h1"})
    v2 = registry.register(c, "m", _run_with_checkpoint(c, cfg, tmp_path, "b"), {"ltcore.dataset_hash": "h2"})
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    # artifacts live under the runs' storage
    assert v1.source.startswith(str(tmp_path / "store" / "mlflow-artifacts")), v1.source
    assert registry.alias_version(c, "m", "champion") is None
    registry.set_alias(c, "m", "champion", "1", expected=None)
    registry.record_decision(c, "m", {"outcome": "promoted", "n": 1}, "1")
    # compare-and-set: a writer that read "no champion" cannot move it now
    with pytest.raises(registry.AliasMoved, match="moved from version None to 1"):
        registry.set_alias(c, "m", "champion", "2", expected=None)
    registry.record_decision(c, "m", {"outcome": "kept", "n": 2}, "2")

    # read back with MLflow's own client
    from mlflow import MlflowClient

    raw = MlflowClient(tracking_uri=c.tracking_uri, registry_uri=c.tracking_uri)
    assert {k: str(v) for k, v in raw.get_registered_model("m").aliases.items()} == {"champion": "1"}
    assert raw.get_model_version("m", "1").tags["ltcore.decision"] == "promoted"
    assert raw.get_model_version("m", "2").tags["ltcore.decision"] == "kept"
    assert raw.get_model_version("m", "2").tags["ltcore.dataset_hash"] == "h2"
    assert [d["outcome"] for d in registry.decisions(raw, "m")] == ["promoted", "kept"]
    assert json.loads(raw.get_registered_model("m").tags["ltcore.last_decision"])["n"] == 2
    assert str(registry.resolve(raw, "m", "champion").version) == "1"
    assert str(registry.resolve(raw, "m", "2").version) == "2"
    with pytest.raises(ValueError, match="no version with alias 'staging'"):
        registry.resolve(raw, "m", "staging")
    got = registry.download_checkpoint(registry.resolve(raw, "m", "champion"), str(tmp_path / "dl"))
    assert (Path(got) / "state.pt").read_bytes() == b"weights a"


def test_lock_excludes_a_second_holder_and_expires(client):
    c, _ = client
    a = registry.RegistryLock(c, "m", ttl_s=60)
    b = registry.RegistryLock(c, "m", ttl_s=60)
    with a, pytest.raises(registry.LockHeld, match="another retrain holds the registry lock"):
        b.acquire()
    b.acquire()  # released: free again
    b._stop.set()  # b stops renewing, as a frozen holder would ...
    c.set_registered_model_tag(b.name, "expires", f"{time.time() - 1:.3f}")  # ... and its lease runs out
    with registry.RegistryLock(c, "m", ttl_s=60) as d:
        assert registry.RegistryLock(c, "m").holder()["owner"] == d.owner
    b.release()  # a late release by the old holder does not remove another holder's lock (none now)
    assert registry.RegistryLock(c, "m").holder() is None


def test_lock_of_a_dead_process_is_taken_over_at_once(client, tmp_path):
    c, _ = client
    lock = registry.RegistryLock(c, "m", ttl_s=3600)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    c.create_registered_model(lock.name, tags={"owner": "gone", "host": os.uname().nodename, "pid": str(proc.pid),
                                               "expires": f"{time.time() + 3600:.3f}"})
    assert registry.RegistryLock.abandoned(lock.holder())
    with lock:
        assert lock.holder()["owner"] == lock.owner


def test_embedded_store_on_object_storage_is_a_config_error():
    from ltcore.config import ConfigError

    cfg = load_config(None, ["train.storage=s3://bucket/runs"])
    with pytest.raises(ConfigError, match="cannot live on"):
        tracking.tracking_uri(cfg, default_embedded=True)
    assert tracking.tracking_uri(cfg, default_embedded=False) is None  # two_stage.py: tracking off by default
