"""Manifest round trip, class-ordered counts, version layout and the content hash."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from ltcore import storage
from ltcore.data.manifest import Manifest, content_hash, manifest_uri, shard_uri, version_uri


def _manifest(**changes: object) -> Manifest:
    kw: dict[str, object] = {
        "name": "toy",
        "hash": "ab" * 32,
        "classes": ("nv", "mel", "df"),
        # dict order differs from class order on purpose: class_counts must follow classes
        "counts": {"train": {"df": 1, "nv": 7, "mel": 3}, "val": {"nv": 1, "mel": 1, "df": 0}},
        "image_size": 64,
        "shards": {"train": ["/x/train/part-00000.parquet"], "val": ["/x/val/part-00000.parquet"]},
        "group_column": "lesion_id",
        "skipped": [{"id": "b7", "reason": "cannot be decoded"}],
        "prepare_config": {"name": "toy", "image_size": 64},
        "created": "2026-01-01T00:00:00+00:00",
    }
    kw.update(changes)
    return Manifest(**kw)  # type: ignore[arg-type]


def test_class_counts_follow_class_order() -> None:
    m = _manifest()
    assert m.class_counts("train") == [7, 3, 1]
    assert m.num_rows("train") == 11 and m.num_rows("val") == 2
    assert m.splits == ["train", "val"]
    with pytest.raises(ValueError, match="no split 'test'"):
        m.class_counts("test")


def test_json_round_trip() -> None:
    m = _manifest()
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert json.loads(m.to_json())["classes"] == ["nv", "mel", "df"]


def test_load_local_and_memory(tmp_path: Path) -> None:
    m = _manifest()
    local = str(tmp_path / "v1" / "manifest.json")
    storage.write_json(local, m.to_dict())
    assert Manifest.load(local) == m
    assert Manifest.load(str(tmp_path / "v1")) == m  # the version folder works too
    mem = f"memory://ltcore-test-{uuid.uuid4().hex[:8]}/toy/manifest.json"
    storage.write_text(mem, m.to_json())
    assert Manifest.load(mem) == m


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError, match="run prepare first"):
        Manifest.load(str(tmp_path / "nothing" / "manifest.json"))
    newer = _manifest(format_version=99)
    (tmp_path / "new.json").write_text(newer.to_json())
    with pytest.raises(ValueError, match="newer than this ltcore reads"):
        Manifest.load(str(tmp_path / "new.json"))
    (tmp_path / "partial.json").write_text(json.dumps({"name": "x", "hash": "y"}))
    with pytest.raises(ValueError, match="classes, counts, image_size, shards"):
        Manifest.load(str(tmp_path / "partial.json"))


def test_version_layout() -> None:
    v = version_uri("s3://bucket/datasets", "ham", "f00d")
    assert v == "s3://bucket/datasets/ham/f00d"
    assert manifest_uri(v) == "s3://bucket/datasets/ham/f00d/manifest.json"
    assert shard_uri(v, "train", 3) == "s3://bucket/datasets/ham/f00d/train/part-00003.parquet"
    assert shard_uri(version_uri("/data/out", "ham", "f00d"), "val", 0) == "/data/out/ham/f00d/val/part-00000.parquet"


_CFG = {"name": "ham", "output": "/a", "image_size": 128, "source": {"kind": "table", "table": "/t.csv",
                                                                     "image_root": "/img", "label_column": "dx"}}
_ROWS = [("i1", "nv", "L1", "train", "sha256:01"), ("i2", "mel", "L2", "test", "sha256:02")]
_CLASSES = ("mel", "nv")


def test_content_hash_is_stable_and_order_free() -> None:
    h = content_hash(_CFG, _CLASSES, _ROWS)
    assert len(h) == 64 and int(h, 16) >= 0
    assert content_hash(_CFG, _CLASSES, list(reversed(_ROWS))) == h


def test_content_hash_ignores_locations() -> None:
    h = content_hash(_CFG, _CLASSES, _ROWS)
    moved = {**_CFG, "output": "s3://b/out", "source": {**_CFG["source"], "table": "s3://b/t.csv",  # type: ignore[dict-item]
                                                          "image_root": "s3://b/img"}}
    assert content_hash(moved, _CLASSES, _ROWS) == h


@pytest.mark.parametrize(
    "change",
    ["image_size", "fingerprint", "label", "split", "classes", "skipped", "label_column"],
)
def test_content_hash_changes_with_content(change: str) -> None:
    h = content_hash(_CFG, _CLASSES, _ROWS)
    cfg, classes, rows, skipped = dict(_CFG), _CLASSES, list(_ROWS), []
    if change == "image_size":
        cfg["image_size"] = 64
    elif change == "label_column":
        cfg["source"] = {**_CFG["source"], "label_column": "y"}  # type: ignore[dict-item]
    elif change == "fingerprint":
        rows[0] = (*rows[0][:4], "sha256:ff")
    elif change == "label":
        rows[0] = ("i1", "mel", "L1", "train", "sha256:01")
    elif change == "split":
        rows[0] = ("i1", "nv", "L1", "val", "sha256:01")
    elif change == "classes":
        classes = ("nv", "mel")
    elif change == "skipped":
        skipped = [{"id": "i3", "reason": "no label"}]
    assert content_hash(cfg, classes, rows, skipped) != h
