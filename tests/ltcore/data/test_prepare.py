"""The prepare job: embedded digits end to end, up-to-date reruns, bad-input policies, nothing partial visible."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ltcore import storage
from ltcore.config import DataConfig, SourceConfig, SplitConfig
from ltcore.data import prepare as prepare_mod
from ltcore.data.manifest import Manifest
from ltcore.data.prepare import prepare_dataset
from ltcore.data.sources import load_source

REPO = Path(__file__).resolve().parents[3]
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int32()), ("group", pa.string())])


def _files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _no_manifest(root: Path) -> None:
    assert not list(root.rglob("manifest.json"))


def _jpeg(rng: np.random.Generator, size: tuple[int, int] = (20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _table_set(root: Path, *, extra_rows: list[dict[str, str]] = (), corrupt: dict[str, bytes] | None = None,
               ) -> SourceConfig:
    """22 tiny JPEGs: class a 12 images (12 lesions), b 6 images (3 lesions of 2), c 4 images (4 lesions)."""
    rng = np.random.default_rng(0)
    rows = [{"image_id": f"a{i:02d}", "dx": "a", "lesion_id": f"La{i}"} for i in range(12)]
    rows += [{"image_id": f"b{i:02d}", "dx": "b", "lesion_id": f"Lb{i // 2}"} for i in range(6)]
    rows += [{"image_id": f"c{i:02d}", "dx": "c", "lesion_id": f"Lc{i}"} for i in range(4)]
    (root / "images").mkdir(parents=True)
    for r in rows:
        (root / "images" / f"{r['image_id']}.jpg").write_bytes(_jpeg(rng))
    for name, data in (corrupt or {}).items():
        (root / "images" / f"{name}.jpg").write_bytes(data)
    pd.DataFrame([*rows, *extra_rows]).to_csv(root / "meta.csv", index=False)
    return SourceConfig(kind="table", table=str(root / "meta.csv"), image_root=str(root / "images"),
                        group_column="lesion_id")


def _read_split(m: Manifest, split: str) -> pa.Table:
    tables = []
    for uri in m.shards[split]:
        fs, path = storage.arrow_fs(uri)
        t = pq.read_table(path, filesystem=fs)
        assert t.schema.equals(SCHEMA), t.schema
        tables.append(t)
    return pa.concat_tables(tables)


# ---------------------------------------------------------------------------------------------------------------
# embedded digits, end to end


@pytest.fixture(scope="module")
def embedded(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[DataConfig, str]:
    out = tmp_path_factory.mktemp("embedded")
    cfg = DataConfig(output=str(out), rows_per_shard=200)
    uri, up_to_date = prepare_dataset(cfg, progress=False)
    assert not up_to_date
    return cfg, uri


@pytest.mark.ray
def test_embedded_manifest_and_shards(embedded: tuple[DataConfig, str]) -> None:
    cfg, uri = embedded
    m = Manifest.load(uri)
    assert uri == storage.join(cfg.output, "digits-lt", m.hash, "manifest.json")
    assert m.classes == tuple(str(d) for d in range(10)) and m.image_size == 32 and m.group_column == ""
    expected = np.bincount(load_source(SourceConfig()).labels, minlength=10)  # 178 (digit 0) ... 9 (digit 9)
    totals = np.sum([m.class_counts(s) for s in ("train", "val", "test")], axis=0)
    assert totals.tolist() == expected.tolist() and totals.sum() == 616
    assert all(n > 0 for n in m.class_counts("train"))
    assert m.prepare_config["image_size"] == 32 and m.skipped == []
    for split in ("train", "val", "test"):
        t = _read_split(m, split)
        assert t.num_rows == m.num_rows(split)
        assert np.bincount(t.column("label").to_numpy(), minlength=10).tolist() == m.class_counts(split)
        assert t.column("group").to_pylist() == t.column("id").to_pylist()  # each digit is its own group
    assert [Path(u).name for u in m.shards["train"]] == ["part-00000.parquet", "part-00001.parquet",
                                                           "part-00002.parquet"]  # 434 rows, 200 per shard
    img = Image.open(io.BytesIO(_read_split(m, "val").column("image")[0].as_py()))
    assert img.format == "PNG" and img.size == (32, 32) and img.mode == "RGB"


@pytest.mark.ray
def test_rerun_is_up_to_date_and_writes_nothing(embedded: tuple[DataConfig, str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg, uri = embedded
    before = _files(Path(cfg.output))
    uri2, up_to_date = prepare_dataset(cfg, progress=True)
    assert up_to_date and uri2 == uri
    assert _files(Path(cfg.output)) == before
    assert f"dataset version {Manifest.load(uri).hash} is up to date" in capsys.readouterr().out


def test_cli_reports_up_to_date_with_last_line(embedded: tuple[DataConfig, str]) -> None:
    cfg, uri = embedded
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # an up-to-date version must not need Ray at all
    r = subprocess.run([sys.executable, "pipelines/prepare_data.py", "--config", "ltcore/configs/demo.yaml",
                        f"output={cfg.output}", "rows_per_shard=200"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == f"dataset: {uri}" and "is up to date" in lines[-2]


def test_cli_bad_override_is_one_line_exit_2() -> None:
    r = subprocess.run([sys.executable, "pipelines/prepare_data.py", "image_sise=64"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown config key") and "image_sise" in err[0]


@pytest.mark.ray
def test_limit_and_imbalance_factor(ray_session: None, tmp_path: Path) -> None:
    cfg = DataConfig(output=str(tmp_path), imbalance_factor=50.0, limit=100)
    m = Manifest.load(prepare_dataset(cfg, progress=False)[0])
    counts = np.sum([m.class_counts(s) for s in m.splits], axis=0)
    # the embedded set (ratio 178 / 9 = 19.8) made ratio 50 (tail ceil(178 / 50) = 4), then 100 rows kept
    assert counts.sum() == 100 and counts[0] == max(counts) and counts[-1] >= 1


# ---------------------------------------------------------------------------------------------------------------
# bad images found while decoding (Ray)


@pytest.mark.ray
def test_corrupt_image_fail_leaves_nothing(ray_session: None, tmp_path: Path) -> None:
    src = _table_set(tmp_path / "src", corrupt={"a03": b"this is not a jpeg"})
    out = tmp_path / "out"
    cfg = DataConfig(name="toy", source=src, output=str(out), image_size=8)
    with pytest.raises(ValueError) as e:
        prepare_dataset(cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "a03.jpg' (id 'a03') cannot be decoded" in msg and "data.on_bad=skip" in msg
    _no_manifest(out)
    assert not [p for p in out.rglob("*") if p.is_file()]  # the failed run's shards were removed


@pytest.mark.ray
def test_corrupt_image_skip_is_listed(ray_session: None, tmp_path: Path) -> None:
    good = _jpeg(np.random.default_rng(1), (40, 30))
    src = _table_set(tmp_path / "src", corrupt={"a03": b"garbage", "b01": good[: len(good) // 2]})  # b01 truncated
    cfg = DataConfig(name="toy", source=src, output=str(tmp_path / "out"), image_size=8, on_bad="skip")
    m = Manifest.load(prepare_dataset(cfg, progress=False)[0])
    assert [s["id"] for s in m.skipped] == ["a03", "b01"]
    assert all("cannot be decoded" in s["reason"] for s in m.skipped)
    assert sum(m.num_rows(s) for s in m.splits) == 20
    ids = {i for s in m.splits for i in _read_split(m, s).column("id").to_pylist()}
    assert "a03" not in ids and "b01" not in ids and len(ids) == 20
    img = Image.open(io.BytesIO(_read_split(m, "train").column("image")[0].as_py()))
    assert img.format == "JPEG" and img.size == (10, 8)  # 20 x 16 with the shorter side made 8


@pytest.mark.ray
def test_source_rows_skipped_are_listed(ray_session: None, tmp_path: Path) -> None:
    # under on_bad=skip, rows the source check drops (before decoding) are listed in the manifest with their reason
    extra = [{"image_id": "x98", "dx": "zzz", "lesion_id": "L98"},  # unknown label
             {"image_id": "x99", "dx": "a", "lesion_id": "L99"},  # no image file
             {"image_id": "a01", "dx": "b", "lesion_id": "L97"}]  # duplicate id
    src = _table_set(tmp_path / "src", extra_rows=extra)
    src = SourceConfig(**{**src.__dict__, "classes": ("a", "b", "c")})
    cfg = DataConfig(name="toy", source=src, output=str(tmp_path / "out"), image_size=8, on_bad="skip")
    m = Manifest.load(prepare_dataset(cfg, progress=False)[0])
    reasons = {s["id"]: s["reason"] for s in m.skipped}
    assert set(reasons) == {"x98", "x99", "a01"}, m.skipped
    assert "'zzz' is not a known class" in reasons["x98"] and "image file" in reasons["x99"]
    assert "duplicate id" in reasons["a01"]
    assert sum(m.num_rows(s) for s in m.splits) == 22  # the 22 good rows, the first a01 among them
    ids = [i for s in m.splits for i in _read_split(m, s).column("id").to_pylist()]
    assert sorted(ids) == sorted(set(ids)) and "x98" not in ids and "x99" not in ids


@pytest.mark.ray
def test_rerun_after_crash_clears_stale_shards(ray_session: None, tmp_path: Path) -> None:
    cfg = DataConfig(name="toy", source=_table_set(tmp_path / "src"), output=str(tmp_path / "out"), image_size=8)
    uri, _ = prepare_dataset(cfg, progress=False)
    version = Path(uri).parent
    Path(uri).unlink()  # as if the run had died before its commit point
    (version / "train" / "part-00042.parquet").write_bytes(b"half written")
    uri2, up_to_date = prepare_dataset(cfg, progress=False)
    assert uri2 == uri and not up_to_date
    assert not (version / "train" / "part-00042.parquet").exists()
    m = Manifest.load(uri2)
    assert m.group_column == "lesion_id" and sum(m.num_rows(s) for s in m.splits) == 22
    groups = {s: set(_read_split(m, s).column("group").to_pylist()) for s in m.splits}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert all(n > 0 for s in m.splits for n in m.class_counts(s))  # every class has >= 3 lesions


# ---------------------------------------------------------------------------------------------------------------
# bad input caught before any cluster work


@pytest.fixture()
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("cluster work started before the bad input was caught")

    monkeypatch.setattr(prepare_mod, "_run_shards", refuse)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown_label", "id 'x99'): label 'zzz' is not a known class"),
        ("missing_image", "id 'x99'): image file"),
        ("duplicate_id", "id 'a01'): duplicate id (first at row 2)"),
        ("empty", "dataset is empty"),
        ("no_training_images", "class 'c' has no training images"),
        ("unwritable_output", "is a file, not a folder"),
        ("bad_fractions", "split fractions must sum to 1"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path: Path, no_cluster: None, case: str, expected: str) -> None:
    extra: list[dict[str, str]] = []
    if case == "unknown_label":
        extra = [{"image_id": "x99", "dx": "zzz", "lesion_id": "L99"}]
    elif case in ("missing_image", "duplicate_id"):
        extra = [{"image_id": "x99" if case == "missing_image" else "a01", "dx": "a", "lesion_id": "L99"}]
    src = _table_set(tmp_path / "src", extra_rows=extra)
    if case == "unknown_label":
        src = SourceConfig(**{**src.__dict__, "classes": ("a", "b", "c")})
    out = tmp_path / "out"
    cfg = DataConfig(name="toy", source=src, output=str(out), image_size=8)
    if case == "empty":
        (tmp_path / "src" / "meta.csv").write_text("image_id,dx,lesion_id\n")
    elif case == "no_training_images":
        # class c keeps one lesion; with test the largest fraction that lesion goes to test
        keep = pd.read_csv(tmp_path / "src" / "meta.csv").query("dx != 'c' or image_id == 'c00'")
        keep.to_csv(tmp_path / "src" / "meta.csv", index=False)
        cfg = DataConfig(name="toy", source=src, output=str(out), split=SplitConfig(train=0.3, val=0.1, test=0.6),
                         min_class_images=1)  # past the class-size check, to reach the split's
    elif case == "unwritable_output":
        out.write_text("a file where the output folder should be")
        cfg = DataConfig(name="toy", source=src, output=str(out / "datasets"))
    elif case == "bad_fractions":
        cfg = DataConfig(name="toy", source=src, output=str(out), split=SplitConfig(train=0.7, val=0.1, test=0.1))
    with pytest.raises(ValueError) as e:
        prepare_dataset(cfg, progress=False)
    assert expected in str(e.value) and "\n" not in str(e.value)
    if out.is_dir():
        _no_manifest(out)


# ---------------------------------------------------------------------------------------------------------------
# shard layout


@pytest.mark.ray
def test_shards_are_random_samples_of_their_split(ray_session: None, tmp_path: Path) -> None:
    # ImageFolder ids are "class/file": in id order each 6-row shard would hold a single class.
    rng = np.random.default_rng(1)
    for c in ("a", "b", "c"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(12):
            (tmp_path / "src" / c / f"{i:02d}.jpg").write_bytes(_jpeg(rng))
    src = SourceConfig(kind="imagefolder", image_root=str(tmp_path / "src"))
    layouts = []
    for out in ("out1", "out2"):
        cfg = DataConfig(name="folders", source=src, output=str(tmp_path / out), image_size=8, rows_per_shard=6,
                         split=SplitConfig(train=1.0, val=0.0, test=0.0))
        m = Manifest.load(prepare_dataset(cfg, progress=False)[0])
        shards = []
        for uri in m.shards["train"]:
            fs, path = storage.arrow_fs(uri)
            shards.append(pq.read_table(path, filesystem=fs, columns=["id", "label"]).to_pydict())
        assert len(shards) == 6 and sorted(i for s in shards for i in s["id"]) == sorted(
            f"{c}/{i:02d}.jpg" for c in "abc" for i in range(12))
        # with 36 rows in a seeded hash order, every shard mixes classes
        assert all(len(set(s["label"])) >= 2 for s in shards), [s["label"] for s in shards]
        layouts.append([s["id"] for s in shards])
    assert layouts[0] == layouts[1]  # the same shards on every run
