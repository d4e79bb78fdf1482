"""Prepare to and from s3:// on the local S3-compatible test server: same counts as a local prepare."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from ltcore import storage
from ltcore.config import DataConfig, SourceConfig
from ltcore.data import prepare as prepare_mod
from ltcore.data import splits
from ltcore.data.ingest import IngestSpec, build_dataset, iter_epoch_local, planned_draws
from ltcore.data.manifest import Manifest
from ltcore.data.prepare import prepare_dataset
from ltcore.data.sources import load_source

pytestmark = [pytest.mark.s3, pytest.mark.ray]


def _source(table: str, images: str) -> SourceConfig:
    return SourceConfig(kind="table", table=table, image_root=images, group_column="lesion_id")


@pytest.fixture()
def ham63(ham10000_dir: Path, tmp_path: Path) -> Path:
    """63 real HAM10000 rows (the first 9 of each class), table + images in a local folder."""
    meta = pd.read_csv(ham10000_dir / "HAM10000_metadata.csv")
    sub = meta.sort_values("image_id").groupby("dx").head(9)
    root = tmp_path / "ham63"
    (root / "images").mkdir(parents=True)
    for i in sub.image_id:
        (root / "images" / f"{i}.jpg").write_bytes((ham10000_dir / "images" / f"{i}.jpg").read_bytes())
    sub.to_csv(root / "meta.csv", index=False)
    return root


def _read_back(m: Manifest) -> dict[str, list[str]]:
    """ids per split, read from the shards with the pyarrow filesystem of each URI."""
    out = {}
    for s in m.splits:
        ids: list[str] = []
        for uri in m.shards[s]:
            fs, path = storage.arrow_fs(uri)
            t = pq.read_table(path, filesystem=fs)
            assert np.bincount(t.column("label").to_numpy(), minlength=len(m.classes)).sum() == t.num_rows
            ids += t.column("id").to_pylist()
        assert len(ids) == m.num_rows(s)
        out[s] = sorted(ids)
    return out


def test_s3_prepare_matches_local(ray_session: None, s3_bucket: str, ham63: Path, tmp_path: Path) -> None:
    local_src = _source(str(ham63 / "meta.csv"), str(ham63 / "images"))
    local = Manifest.load(prepare_dataset(DataConfig(name="ham63", source=local_src, output=str(tmp_path / "out"),
                                                     image_size=64), progress=False)[0])

    # local images, dataset version written to S3: the same version (the hash ignores locations)
    to_s3 = DataConfig(name="ham63", source=local_src, output=f"{s3_bucket}/datasets", image_size=64)
    uri, up_to_date = prepare_dataset(to_s3, progress=False)
    assert not up_to_date and uri == f"{s3_bucket}/datasets/ham63/{local.hash}/manifest.json"
    remote = Manifest.load(uri)
    assert remote.classes == local.classes and remote.counts == local.counts and len(remote.classes) == 7
    assert all(u.startswith(f"{s3_bucket}/datasets/ham63/{local.hash}/") for s in remote.splits
               for u in remote.shards[s])
    assert _read_back(remote) == _read_back(local)
    assert prepare_dataset(to_s3, progress=False) == (uri, True)

    # read back by ingest from S3, on Ray (Ray Data tasks read the shards over HTTP) and in this process
    for split in remote.splits:
        spec = IngestSpec(split=split, views=("test",), image_size=32, shuffle=False)
        expected = local.class_counts(split)
        rows = build_dataset(uri, spec, num_cpus=0.5, decode_batch_size=16).take_all()
        assert np.bincount([r["label"] for r in rows], minlength=7).tolist() == expected
        assert all(r["image"].shape == (3, 32, 32) for r in rows)
        labels = torch.cat([b["label"] for b in iter_epoch_local(uri, spec, 0, batch_size=16)])
        assert np.bincount(labels.numpy(), minlength=7).tolist() == expected

    # table and images on S3 too: listed and read through s3fs, fingerprinted by ETag
    fs, root = storage.fsspec_fs(f"{s3_bucket}/raw")
    fs.put(str(ham63 / "images"), f"{root}/images", recursive=True)
    fs.put(str(ham63 / "meta.csv"), f"{root}/meta.csv")
    s3_src = _source(f"{s3_bucket}/raw/meta.csv", f"{s3_bucket}/raw/images")
    all_s3 = Manifest.load(prepare_dataset(DataConfig(name="ham63", source=s3_src, output=f"{s3_bucket}/datasets",
                                                      image_size=64), progress=False)[0])
    assert all_s3.counts == local.counts and _read_back(all_s3) == _read_back(local)


def test_missing_bucket_is_a_clear_error_before_cluster_work(s3_server: dict[str, str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("cluster work started")

    monkeypatch.setattr(prepare_mod, "_run_shards", refuse)
    cfg = DataConfig(output="s3://ltcore-no-such-bucket/datasets")
    with pytest.raises(storage.StorageError) as e:
        prepare_dataset(cfg, progress=False)
    msg = str(e.value)
    assert "bucket 'ltcore-no-such-bucket'" in msg and "does not exist" in msg and "\n" not in msg


def test_full_ham10000_to_s3(ray_session: None, s3_bucket: str, ham10000_dir: Path) -> None:
    src = _source(str(ham10000_dir / "HAM10000_metadata.csv"), str(ham10000_dir / "images"))
    cfg = DataConfig(name="ham10000", source=src, output=f"{s3_bucket}/datasets", image_size=128)
    t0 = time.monotonic()
    uri = prepare_dataset(cfg, progress=False)[0]
    m = Manifest.load(uri)
    print(f"\nHAM10000 -> S3 prepare: {time.monotonic() - t0:.1f} s, hash {m.hash}")
    # what a local prepare writes: the same pure split of the same table
    table = load_source(src)
    parts = splits.group_stratified_split(table.labels, table.groups, {"train": 0.7, "val": 0.1, "test": 0.2}, 0,
                                          num_classes=len(table.classes))
    for s, idx in parts.items():
        assert m.class_counts(s) == np.bincount(table.labels[idx], minlength=7).tolist()
    assert sum(m.num_rows(s) for s in m.splits) == 10_015
    assert {s: len(v) for s, v in _read_back(m).items()} == {s: len(idx) for s, idx in parts.items()}
    # ingest's own reader of the S3 shards (ids + labels; one plain epoch draws each row once)
    for s, idx in parts.items():
        _, y, reps = planned_draws(uri, IngestSpec(split=s, views=("test",), shuffle=False), 0)
        assert np.bincount(y, weights=reps, minlength=7).astype(int).tolist() == m.class_counts(s)
        assert reps.tolist() == [1] * len(idx)
