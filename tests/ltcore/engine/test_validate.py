"""Bad configs fail with one line naming the key, before any Ray work starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ltcore.config import ConfigError, load_config
from ltcore.data.manifest import Manifest
from ltcore.engine.pipeline import validate

REPO = Path(__file__).resolve().parents[3]
DEMO = str(REPO / "ltcore" / "configs" / "demo.yaml")
pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage1.method=crossentropy", r"stage1.method: 'crossentropy' is not valid; choose one of .*\bce\b"),
        ("stage2.method=platt", r"stage2.method: 'platt' is not valid; choose one of .*\bcrt\b"),
        ("model.backbone=resnet9000", r"model.backbone: 'resnet9000' is neither an ltcore backbone"),
        ("stage1.epochs=0", r"stage1.epochs must be >= 1"),
        ("train.num_workers=0", r"train.num_workers must be >= 1"),
        ("train.torch_threads=-1", r"train.torch_threads must be >= 0"),
        ("train.progress_every_s=-5", r"train.progress_every_s must be >= 0"),
    ],
)
def test_validate_rejects(override, message):
    # Method and backbone names are checked by validate; ranges already when the config is loaded.
    with pytest.raises(ConfigError, match=message):
        validate(load_config(DEMO, [override]))


def test_validate_accepts_every_shipped_config():
    for path in sorted((REPO / "ltcore" / "configs").glob("*.yaml")):
        if path.name == "ham10000_base.yaml" or path.name == "ham10000.yaml":
            continue  # bases, not runnable on their own
        if path.name.startswith("study_"):
            continue  # study files (tests/ltcore/tune checks them)
        validate(load_config(str(path)))


def _two_stage_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "two_stage.py"), *overrides,
                           f"train.storage={tmp_path / 'store'}", f"data.output={tmp_path / 'datasets'}"],
                          capture_output=True, text=True, timeout=100, env=env, cwd=tmp_path)


def test_two_stage_cli_bad_config_is_one_line_and_starts_no_ray(tmp_path):
    proc = _two_stage_cli(tmp_path, "stage1.method=nope")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("error: stage1.method: 'nope' is not valid"), proc.stderr
    assert not (tmp_path / "store").exists()  # nothing written


DIGITS = ", ".join(str(d) for d in range(10))


def test_two_stage_cli_jrcl_unknown_normal_class_fails_before_any_work(tmp_path):
    # The demo's embedded digits are classes 0..9: the config default 'nv' (HAM10000's) is not one of them.
    proc = _two_stage_cli(tmp_path, "stage1.method=jrcl", "stage1.loss.normal_class=nv")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: stage1.loss.normal_class: 'nv' is not a class of dataset 'digits-lt'; "
                     f"choose one of {DIGITS}"], proc.stderr
    assert proc.stdout == ""  # no prepare or Ray start-up lines
    assert not (tmp_path / "store").exists()  # no run folder, no config.yaml
    assert not (tmp_path / "datasets").exists()  # not even the dataset was prepared


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage1.loss.normal_class=nv"],
         rf"^stage1.loss.normal_class: 'nv' is not a class of dataset 'digits-lt'; choose one of {DIGITS}$"),
        (["stage1.loss.normal_class="],
         rf"^stage1.loss.normal_class is empty; stage1.method=jrcl needs the dataset's normal class; "
         rf"choose one of {DIGITS}$"),
        # classes listed in the source config are known before prepare
        (["data.source.kind=table", "data.source.classes=[akiec, mel]"],
         r"^stage1.loss.normal_class: 'nv' is not a class of dataset 'digits-lt'; choose one of akiec, mel$"),
    ],
)
def test_validate_rejects_jrcl_normal_class(overrides, message):
    cfg = load_config(DEMO, ["stage1.method=jrcl", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def _manifest(classes: tuple[str, ...]) -> Manifest:
    counts = {s: dict.fromkeys(classes, 3) for s in ("train", "val", "test")}
    return Manifest(name="cxr", hash="h0", classes=classes, counts=counts, image_size=32,
                    shards={s: [] for s in counts})


def test_validate_jrcl_normal_class_against_manifest(tmp_path):
    classes = ("Atelectasis", "No Finding", "Effusion")
    # A table source that lists no classes: they are unknown before prepare, so only the manifest can tell.
    cfg = load_config(DEMO, ["stage1.method=jrcl", "stage1.loss.normal_class=nv", "data.source.kind=table"])
    validate(cfg)
    with pytest.raises(ConfigError, match=r"^stage1.loss.normal_class: 'nv' is not a class of dataset 'cxr'; "
                                          r"choose one of Atelectasis, No Finding, Effusion$"):
        validate(cfg, _manifest(classes))
    validate(load_config(DEMO, ["stage1.method=jrcl", "stage1.loss.normal_class=No Finding"]), _manifest(classes))
    # `dataset` naming a prepared version: its manifest is read before any cluster work
    path = tmp_path / "manifest.json"
    path.write_text(_manifest(classes).to_json())
    with pytest.raises(ConfigError, match=r"'nv' is not a class of dataset 'cxr'; choose one of Atelectasis, "):
        validate(load_config(DEMO, ["stage1.method=jrcl", "stage1.loss.normal_class=nv", f"dataset={path}"]))
    validate(load_config(DEMO, ["stage1.method=jrcl", "stage1.loss.normal_class=No Finding", f"dataset={path}"]))


def test_validate_normal_class_only_matters_for_jrcl(tmp_path):
    validate(load_config(DEMO, ["stage1.loss.normal_class=nv"]))  # ce ignores it
    # nor is a non-JRCL run's `dataset` manifest read at validate time
    validate(load_config(DEMO, ["stage1.loss.normal_class=nv", f"dataset={tmp_path / 'missing.json'}"]))
    validate(load_config(DEMO, ["stage1.method=jrcl", "stage1.loss.normal_class=3"]))


def test_prepare_checks_normal_class_before_writing(tmp_path):
    """A source whose classes only prepare learns: the check runs once the source is read, before any writes."""
    import ray
    from PIL import Image

    from ltcore.engine.pipeline import ensure_dataset

    for cls in ("benign", "malignant"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "images" / cls / f"{i}.png")
    cfg = load_config(DEMO, ["stage1.method=jrcl", "stage1.loss.normal_class=nv", "data.source.kind=imagefolder",
                             f"data.source.image_root={tmp_path / 'images'}", f"data.output={tmp_path / 'datasets'}",
                             "data.name=lesions"])
    validate(cfg)  # unknown yet
    ray_before = ray.is_initialized()  # the session's shared Ray may already run when the whole suite does
    with pytest.raises(ConfigError, match=r"^stage1.loss.normal_class: 'nv' is not a class of dataset 'lesions'; "
                                          r"choose one of benign, malignant$"):
        ensure_dataset(cfg)
    assert not (tmp_path / "datasets").exists()
    assert ray.is_initialized() == ray_before  # prepare stopped before starting Ray
