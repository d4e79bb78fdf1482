"""retrain.py end to end on a growing image folder of digits: promote, nothing to do, a worse challenger kept out,
a retrain killed between registering and aliasing, two retrains at once. The registry is read back with MLflow's
own client.

Measured: the first test (3 retrain.py runs, 2 of them training) took 17 min on the shared 2-core machine under a load
average of 40-90 (other engineers' Ray jobs); the second trains 3 times and is marked slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ltcore.lifecycle import gate

from .conftest import COUNTS, REPO, RETRAIN, last_line, retrain_overrides, run_script, subprocess_env, write_digits

# each test drives several retrain.py runs (minutes each on 2 cores): `make test-all`
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(2400)]
CONFIG = str(REPO / "ltcore" / "configs" / "retrain_demo.yaml")


def _runs(tmp: Path) -> set[str]:
    runs = tmp / "store" / "runs"
    return {p.name for p in runs.iterdir()} if runs.exists() else set()


def _retrain(tmp: Path, images: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_script(RETRAIN, ["--config", CONFIG, *retrain_overrides(tmp, images), *extra])


def _champion(c) -> str:
    return str(c.get_model_version_by_alias("digits5", "champion").version)


def _check_decision_follows_rule(detail: dict) -> None:
    """The recorded numbers, put through the gate's rule again, give the recorded outcome."""
    again = gate.decide(detail["challenger"], detail["champion"],
                        tol_balanced_accuracy=detail["tolerances"]["balanced_accuracy"],
                        tol_few_accuracy=detail["tolerances"]["few_accuracy"])
    assert again.outcome == detail["outcome"], detail


def test_promote_then_nothing_to_do_then_worse_challenger_kept(tmp_path, registry_client):
    images = tmp_path / "images"
    write_digits(images)

    first = _retrain(tmp_path, images)
    assert first.returncode == 0, first.stderr[-3000:]
    assert last_line(first).startswith("promoted: digits5 version 1 is champion"), last_line(first)
    c = registry_client(tmp_path / "store")
    assert _champion(c) == "1"
    v1 = c.get_model_version("digits5", "1")
    assert v1.tags["ltcore.decision"] == "promoted"
    for key in ("ltcore.run_id", "ltcore.dataset_hash", "ltcore.config_hash", "test.balanced_accuracy",
                "test.few_accuracy", "test.recall.4"):
        assert v1.tags[key], key
    # The version's checkpoint is in the run's artifacts, next to the report; the MLflow run has the metrics.
    run = c.get_run(v1.run_id)
    assert run.data.metrics["test_balanced_accuracy"] == pytest.approx(float(v1.tags["test.balanced_accuracy"]))
    assert {f.path for f in c.list_artifacts(v1.run_id)} >= {"checkpoint", "report.json", "confusion_matrix.png"}
    assert {f.path for f in c.list_artifacts(v1.run_id, "checkpoint")} >= {"checkpoint/state.pt",
                                                                            "checkpoint/meta.json"}
    first_decision = json.loads(c.get_registered_model("digits5").tags["ltcore.last_decision"])
    assert first_decision["outcome"] == "promoted" and first_decision["champion"] is None
    # Balanced accuracy the gate measured in-process equals the run's own test metric (same split, same model).
    assert first_decision["challenger"]["balanced_accuracy"] == pytest.approx(
        run.data.metrics["test_balanced_accuracy"], abs=1e-9)

    # Unchanged data and config: nothing trained, exit 0.
    before = _runs(tmp_path)
    again = _retrain(tmp_path, images)
    assert again.returncode == 0, again.stderr[-3000:]
    assert last_line(again).startswith("nothing to do: champion (version 1)"), last_line(again)
    assert _runs(tmp_path) == before

    # A challenger made worse on purpose (one step of stage 1, no stage 2) is kept out; the alias stays.
    worse = _retrain(tmp_path, images, "stage1.epochs=1", "train.max_steps_per_epoch=1", "stage2.method=none")
    assert worse.returncode == 3, (worse.stdout[-2000:], worse.stderr[-3000:])
    assert last_line(worse).startswith("kept champion: digits5 version 1 stays champion; version 2 kept out"), \
        last_line(worse)
    assert _champion(c) == "1"
    v2 = c.get_model_version("digits5", "2")
    assert v2.tags["ltcore.decision"] == "kept"
    detail = json.loads(v2.tags["ltcore.decision_detail"])
    assert detail["challenger"]["balanced_accuracy"] < detail["champion"]["balanced_accuracy"] - 0.02
    _check_decision_follows_rule(detail)
    log = [d["outcome"] for d in json.loads(json.dumps(
        [json.loads(v) for k, v in sorted(c.get_registered_model("digits5").tags.items())
         if k.startswith("ltcore.decision.")]))]
    assert log == ["promoted", "nothing to do", "kept"]


def _killed_at_alias(tmp: Path, images: Path) -> subprocess.CompletedProcess:
    """retrain.py in a process that is SIGKILLed when it moves the alias: after registering, before aliasing."""
    # Tolerances of 1 make this challenger pass the gate, so the process reaches the alias move and dies there
    # (a first run of this test saw the gate keep it out on few-shot accuracy, 0.17 vs 0.50, and never move the
    # alias). Tolerances are not part of the training config: the next retrain gates the same version with the
    # config's own tolerances.
    args = ["--config", CONFIG, *retrain_overrides(tmp, images), "retrain.tolerance_balanced_accuracy=1",
            "retrain.tolerance_few_accuracy=1"]
    code = (
        "import os, runpy, signal, sys\n"
        "from mlflow import MlflowClient\n"
        "MlflowClient.set_registered_model_alias = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"sys.argv = [{str(RETRAIN)!r}, *{args!r}]\n"
        f"runpy.run_path({str(RETRAIN)!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=subprocess_env())


@pytest.mark.slow
def test_new_data_kill_between_register_and_alias_and_concurrent_retrains(tmp_path, registry_client):
    images = tmp_path / "images"
    write_digits(images)
    first = _retrain(tmp_path, images)
    assert first.returncode == 0, first.stderr[-3000:]
    c = registry_client(tmp_path / "store")
    assert _champion(c) == "1"

    # New images arrive; the retrain is killed between registering version 2 and moving the alias.
    write_digits(images, counts=tuple(n // 2 + 2 for n in COUNTS), offset=max(COUNTS))
    killed = _killed_at_alias(tmp_path, images)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert _champion(c) == "1"  # the old champion still serves
    assert c.get_model_version("digits5", "2").tags["ltcore.decision"] == "pending"
    assert c.get_registered_model("digits5.retrain-lock").tags["pid"]  # the dead holder's lock is left behind

    # The next retrain takes the dead holder's lock over, and gates version 2 without training again; the gate
    # decides by the numbers.
    runs_before = _runs(tmp_path)
    after = _retrain(tmp_path, images)
    assert after.returncode in (0, 3), after.stderr[-3000:]
    assert "never gated: gating it now" in after.stdout
    assert _runs(tmp_path) == runs_before
    detail = json.loads(c.get_model_version("digits5", "2").tags["ltcore.decision_detail"])
    _check_decision_follows_rule(detail)
    assert detail["test_images"] > json.loads(c.get_model_version("digits5", "1").tags["ltcore.decision_detail"])[
        "test_images"]  # judged on the grown test split
    expected = "2" if detail["outcome"] == "promoted" else "1"
    assert _champion(c) == expected
    assert after.returncode == (0 if detail["outcome"] == "promoted" else 3)
    assert last_line(after).startswith("promoted:" if detail["outcome"] == "promoted" else "kept champion:")

    # Two retrains started together (a new config): one trains and is gated, the other finds the lock held.
    env = subprocess_env()
    args = ["--config", CONFIG, *retrain_overrides(tmp_path, images), "train.seed=1"]
    procs = [subprocess.Popen([sys.executable, str(RETRAIN), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    lasts = [o[0].strip().splitlines()[-1] if o[0].strip() else o[1][-500:] for o in outs]
    busy = [s for s in lasts if s.startswith("nothing to do: another retrain holds the registry lock")]
    assert len(busy) == 1, lasts
    versions = sorted(int(v.version) for v in c.search_model_versions("name='digits5'"))
    assert versions == [1, 2, 3], versions
    promoted = [v for v in c.search_model_versions("name='digits5'") if v.tags.get("ltcore.decision") == "promoted"]
    assert sorted(str(v.version) for v in promoted) in (["1"], ["1", "2"], ["1", "3"], ["1", "2", "3"])
    _check_decision_follows_rule(json.loads(c.get_model_version("digits5", "3").tags["ltcore.decision_detail"]))
