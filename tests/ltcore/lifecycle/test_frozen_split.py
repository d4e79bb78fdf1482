"""A frozen test split across dataset versions: extending a previous version keeps every old group's split, and a
predefined split column is honoured exactly."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from ltcore.config import load_config
from ltcore.data.manifest import Manifest
from ltcore.data.splits import extend_split, group_stratified_split

from .conftest import COUNTS, write_digits

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def test_extend_split_keeps_fixed_groups_and_splits_new_ones_by_the_seeded_rule():
    labels = np.array([0] * 20 + [1] * 10)
    groups = np.array([f"g{i}" for i in range(30)])
    old = group_stratified_split(labels[:24], groups[:24], FRACTIONS, seed=3)
    fixed = {str(groups[i]): s for s, idx in old.items() for i in idx}
    parts = extend_split(labels, groups, FRACTIONS, 3, fixed)
    for s, idx in old.items():
        assert set(idx.tolist()) <= set(parts[s].tolist())  # every old image keeps its split
    # rows 24..29, the new groups, all of class 1: split by the same rule on their own (class 1 as the only class)
    new_rule = group_stratified_split(labels[24:] - 1, groups[24:], FRACTIONS, seed=3)
    for s, idx in new_rule.items():
        assert set((idx + 24).tolist()) <= set(parts[s].tolist())
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(30))


def test_extend_split_rejects_unknown_split_and_missing_train_class():
    with pytest.raises(ValueError, match="'holdout' is not one of"):
        extend_split([0, 1], ["a", "b"], FRACTIONS, 0, {"a": "holdout"})
    with pytest.raises(ValueError, match="class '1' has no training images"):
        extend_split([0, 1], ["a", "b"], FRACTIONS, 0, {"a": "train", "b": "test"})


def _ids(manifest_uri: str, split: str) -> set[str]:
    m = Manifest.load(manifest_uri)
    return {i for u in m.shards[split] for i in pq.read_table(u, columns=["id"]).column("id").to_pylist()}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_added_images_keep_old_test_images_in_test(ray_session, tmp_path):
    from ltcore.data.prepare import prepare_dataset

    images = tmp_path / "images"
    write_digits(images)
    cfg = load_config(None, ["data.source.kind=imagefolder", f"data.source.image_root={images}", "data.name=d5",
                             f"data.output={tmp_path / 'ds'}", "data.image_size=8"]).data
    v1, _ = prepare_dataset(cfg, progress=False)
    write_digits(images, counts=tuple(n // 2 + 2 for n in COUNTS), offset=max(COUNTS))  # new images arrive
    v2, _ = prepare_dataset(cfg, progress=False, previous=v1)
    assert v2 != v1
    for split in ("train", "val", "test"):
        assert _ids(v1, split) <= _ids(v2, split), split
    assert len(_ids(v2, "test")) > len(_ids(v1, "test"))  # new groups were split too
    # Without the previous version the grown source is split afresh, and old test images move: what extending
    # prevents (so this test can fail).
    fresh, _ = prepare_dataset(cfg, progress=False)
    assert not _ids(v1, "test") <= _ids(fresh, "test")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_predefined_split_column_is_honoured_exactly(ray_session, tmp_path):
    import pandas as pd

    from ltcore.data.prepare import prepare_dataset

    images = tmp_path / "images"
    rels = write_digits(images)
    rng = np.random.default_rng(0)
    given = rng.choice(["train", "val", "test", ""], size=len(rels), p=[0.5, 0.1, 0.2, 0.2])
    given[: len(COUNTS)] = "train"
    df = pd.DataFrame({"image_id": [r[:-4] for r in rels], "dx": [r.split("/")[0] for r in rels], "split": given})
    df.to_csv(images / "labels.csv", index=False)
    cfg = load_config(None, ["data.source.kind=table", f"data.source.table={images / 'labels.csv'}",
                             "data.source.path_template='{id}.png'", "data.source.split_column=split",
                             "data.name=d5t", f"data.output={tmp_path / 'ds'}", "data.image_size=8"]).data
    uri, _ = prepare_dataset(cfg, progress=False)
    for split in ("train", "val", "test"):
        want = set(df.image_id[df.split == split])
        got = _ids(uri, split)
        assert want <= got, split
        assert not (got & set(df.image_id[(df.split != split) & (df.split != "")])), split
    bad = df.copy()
    bad.loc[7, "split"] = "holdout"
    bad.to_csv(images / "labels.csv", index=False)
    with pytest.raises(ValueError, match="'holdout'; use one of train, val, test"):
        prepare_dataset(cfg, progress=False)
