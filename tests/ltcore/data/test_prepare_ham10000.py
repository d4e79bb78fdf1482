"""HAM10000 from ../shared/data/ham10000 at image_size 128: counts, no lesion leakage, all classes everywhere."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ltcore.data.manifest import Manifest
from ltcore.data.prepare import prepare_dataset

# README counts of the dx column
HAM_COUNTS = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}


@pytest.mark.ray
def test_ham10000_prepare(ham10000_version, ham10000_dir: Path) -> None:  # ham10000_version: data/conftest.py
    uri, cfg = ham10000_version.uri, ham10000_version.config
    assert not ham10000_version.first_up_to_date
    m = Manifest.load(uri)
    print(f"\nHAM10000 prepare: {ham10000_version.first_wall_s:.1f} s, hash {m.hash}, counts {m.counts}")

    assert m.classes == tuple(sorted(HAM_COUNTS)) and m.group_column == "lesion_id" and m.image_size == 128
    totals = {c: sum(m.counts[s][c] for s in m.splits) for c in m.classes}
    assert totals == HAM_COUNTS and sum(totals.values()) == 10_015
    for s in ("train", "val", "test"):
        assert all(n > 0 for n in m.class_counts(s)), (s, m.counts[s])  # all 7 classes in every split
    for c, n in HAM_COUNTS.items():  # stratified: each class close to 70 / 10 / 20
        assert abs(m.counts["train"][c] / n - 0.7) < 0.03, c

    meta = pd.read_csv(ham10000_dir / "HAM10000_metadata.csv")
    lesion = dict(zip(meta.image_id, meta.lesion_id))
    lesions = {}
    for s in m.splits:
        t = pq.read_table(m.shards[s], columns=["id", "group", "label"])
        assert t.num_rows == m.num_rows(s)
        ids, groups = t.column("id").to_pylist(), t.column("group").to_pylist()
        assert all(lesion[i] == g for i, g in zip(ids, groups))  # the group column is the lesion id
        lesions[s] = set(groups)
    assert not (lesions["train"] & lesions["val"]) and not (lesions["train"] & lesions["test"])
    assert not (lesions["val"] & lesions["test"])  # no lesion in two splits
    assert sum(len(v) for v in lesions.values()) == meta.lesion_id.nunique() == 7470

    first = pq.read_table(m.shards["test"][0], columns=["image"]).column("image")[0].as_py()
    img = Image.open(io.BytesIO(first))
    assert img.format == "JPEG" and img.size == (171, 128)  # 200 x 150 with the shorter side made 128

    uri2, up_to_date2 = prepare_dataset(cfg, progress=False)
    assert up_to_date2 and uri2 == uri and Manifest.load(uri2).hash == m.hash
