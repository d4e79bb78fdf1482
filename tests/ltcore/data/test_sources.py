"""Sources: label tables (single column, one-hot, CSV, Parquet), ImageFolder, embedded digits; validation."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ltcore import storage
from ltcore.config import SourceConfig
from ltcore.data.sources import EMBEDDED_CLASSES, SourceTable, fingerprints, load_source


def _png(value: int, size: tuple[int, int] = (6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _write_set(root: Path, rows: list[dict[str, str]], *, images: list[str] | None = None, name: str = "labels.csv",
               ) -> SourceConfig:
    """A label table at ``root/name`` and one tiny PNG per id (or per ``images``) under ``root/img``."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(images if images is not None else [r["image_id"] for r in rows]):
        (root / "img" / f"{i}.png").write_bytes(_png(10 * k % 250))
    df = pd.DataFrame(rows)
    if name.endswith(".parquet"):
        df.to_parquet(root / name)
    else:
        df.to_csv(root / name, index=False)
    return SourceConfig(kind="table", table=str(root / name), image_root=str(root / "img"), path_template="{id}.png",
                        id_column="image_id", label_column="dx")


ROWS = [
    {"image_id": "c3", "dx": "nv", "lesion_id": "L1"},
    {"image_id": "a1", "dx": "mel", "lesion_id": "L2"},
    {"image_id": "b2", "dx": "nv", "lesion_id": "L1"},
    {"image_id": "d4", "dx": "df", "lesion_id": "L3"},
]


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name", ["labels.csv", "labels.parquet"])
def test_table_single_label_column(tmp_path: Path, name: str) -> None:
    cfg = _write_set(tmp_path, ROWS, name=name)
    cfg = SourceConfig(**{**cfg.__dict__, "group_column": "lesion_id"})
    t = load_source(cfg)
    assert t.classes == ("df", "mel", "nv")  # sorted label names
    assert t.ids == ("a1", "b2", "c3", "d4")  # sorted by id, whatever the table order
    assert t.labels.tolist() == [1, 2, 2, 0]
    assert t.groups == ("L2", "L1", "L1", "L3")
    assert t.paths == ("a1.png", "b2.png", "c3.png", "d4.png")
    assert t.group_column == "lesion_id" and t.image_format == "JPEG" and not t.inline
    first = next(t.rows())
    assert first == ("a1", str(tmp_path / "img" / "a1.png"), "mel", "L2")
    assert t.infos[0]["size"] == (tmp_path / "img" / "a1.png").stat().st_size


def test_table_class_order_from_config_and_default_groups(tmp_path: Path) -> None:
    cfg = _write_set(tmp_path, ROWS)
    t = load_source(SourceConfig(**{**cfg.__dict__, "classes": ("nv", "mel", "df")}))
    assert t.label_names() == ["mel", "nv", "nv", "df"]
    assert t.labels.tolist() == [1, 0, 0, 2]
    assert t.groups == t.ids  # no group column: each image is its own group


def test_table_path_template_uses_other_columns(tmp_path: Path) -> None:
    rows = [{"image_id": "x1", "dx": "a", "folder": "p1"}, {"image_id": "x2", "dx": "b", "folder": "p2"}]
    for r in rows:
        (tmp_path / "img" / r["folder"]).mkdir(parents=True)
        (tmp_path / "img" / r["folder"] / f"{r['image_id']}.png").write_bytes(_png(1))
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    cfg = SourceConfig(kind="table", table=str(tmp_path / "t.csv"), image_root=str(tmp_path / "img"),
                       path_template="{folder}/{id}.png")
    assert load_source(cfg).paths == ("p1/x1.png", "p2/x2.png")


def test_table_one_hot_columns(tmp_path: Path) -> None:
    rows = [
        {"image_id": "i1", "MEL": "1.0", "NV": "0.0", "DF": "0.0"},
        {"image_id": "i2", "MEL": "0.0", "NV": "1.0", "DF": "0.0"},
        {"image_id": "i3", "MEL": "0.0", "NV": "0.0", "DF": "1.0"},
    ]
    cfg = _write_set(tmp_path, rows)
    cfg = SourceConfig(**{**cfg.__dict__, "label_columns": ("MEL", "NV", "DF")})
    t = load_source(cfg)
    assert t.classes == ("MEL", "NV", "DF")  # the published column order, not sorted
    assert t.labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize(("values", "reason"), [(("0", "0", "0"), "0 of the one-hot"), (("1", "1", "0"), "2 of the")])
def test_table_one_hot_not_exactly_one(tmp_path: Path, values: tuple[str, ...], reason: str) -> None:
    rows = [{"image_id": "ok", "MEL": "1", "NV": "0", "DF": "0"},
            {"image_id": "bad7", "MEL": values[0], "NV": values[1], "DF": values[2]}]
    cfg = SourceConfig(**{**_write_set(tmp_path, rows).__dict__, "label_columns": ("MEL", "NV", "DF")})
    with pytest.raises(ValueError) as e:
        load_source(cfg)
    msg = _one_line(e)
    assert "'bad7'" in msg and reason in msg and "data.on_bad=skip" in msg
    t = load_source(cfg, on_bad="skip")
    assert t.ids == ("ok",) and t.skipped[0]["id"] == "bad7"


def test_unknown_label_fail_and_skip(tmp_path: Path) -> None:
    cfg = _write_set(tmp_path, [*ROWS, {"image_id": "e5", "dx": "zzz", "lesion_id": "L4"}])
    cfg = SourceConfig(**{**cfg.__dict__, "classes": ("df", "mel", "nv")})
    with pytest.raises(ValueError) as e:
        load_source(cfg)
    msg = _one_line(e)
    assert "row 5 (id 'e5')" in msg and "'zzz' is not a known class" in msg and "data.source.classes" in msg
    t = load_source(cfg, on_bad="skip")
    assert len(t) == 4
    assert t.skipped == ({"id": "e5", "reason": "label 'zzz' is not a known class (df, mel, nv)"},)


def test_missing_label(tmp_path: Path) -> None:
    cfg = _write_set(tmp_path, [*ROWS, {"image_id": "e5", "dx": "", "lesion_id": "L4"}])
    with pytest.raises(ValueError, match=r"id 'e5'.*no label in 'dx'"):
        load_source(cfg)


def test_duplicate_id_fail_and_skip(tmp_path: Path) -> None:
    rows = [*ROWS, {"image_id": "b2", "dx": "mel", "lesion_id": "L9"}]
    cfg = _write_set(tmp_path, rows, images=["a1", "b2", "c3", "d4"])
    with pytest.raises(ValueError) as e:
        load_source(cfg)
    msg = _one_line(e)
    assert "id 'b2'" in msg and "duplicate id (first at row 3)" in msg
    t = load_source(cfg, on_bad="skip")
    assert t.ids == ("a1", "b2", "c3", "d4") and t.label_names()[1] == "nv"  # the first occurrence stays
    assert t.skipped[0]["id"] == "b2"


def test_missing_image_fail_and_skip(tmp_path: Path) -> None:
    cfg = _write_set(tmp_path, ROWS, images=["a1", "b2", "d4"])  # no c3.png
    with pytest.raises(ValueError) as e:
        load_source(cfg)
    msg = _one_line(e)
    assert "id 'c3'" in msg and "c3.png' does not exist" in msg
    t = load_source(cfg, on_bad="skip")
    assert t.ids == ("a1", "b2", "d4") and "does not exist" in t.skipped[0]["reason"]


def test_empty_image_root_is_named(tmp_path: Path) -> None:
    cfg = _write_set(tmp_path, ROWS)
    cfg = SourceConfig(**{**cfg.__dict__, "image_root": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match=r"nowhere' \(data\.source\.image_root\) holds no files"):
        load_source(cfg)


def test_missing_column_names_column_and_key(tmp_path: Path) -> None:
    cfg = SourceConfig(**{**_write_set(tmp_path, ROWS).__dict__, "group_column": "patient"})
    with pytest.raises(ValueError, match=r"column 'patient' \(data.source.group_column\) is not in the table"):
        load_source(cfg)


def test_missing_table_is_a_storage_error(tmp_path: Path) -> None:
    cfg = SourceConfig(kind="table", table=str(tmp_path / "none.csv"), image_root=str(tmp_path))
    with pytest.raises(storage.StorageError, match=r"label table \(data\.source\.table\): .*none\.csv' does not exist"):
        load_source(cfg)


def test_empty_table_and_all_skipped(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "t.csv").write_text("image_id,dx\n")
    cfg = SourceConfig(kind="table", table=str(tmp_path / "t.csv"), image_root=str(tmp_path / "img"))
    with pytest.raises(ValueError, match="dataset is empty"):
        load_source(cfg)
    cfg2 = _write_set(tmp_path / "b", ROWS, images=[])
    with pytest.raises(ValueError, match=r"dataset is empty: .* \(4 skipped\)"):
        load_source(cfg2, on_bad="skip")


def test_imagefolder(tmp_path: Path) -> None:
    for cls, names in {"cat": ["b.png", "a.jpg"], "dog": ["x/c.png"], "eel": ["d.png"]}.items():
        for n in names:
            p = tmp_path / cls / n
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_png(3))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "top.png").write_bytes(_png(1))  # not in a class folder
    t = load_source(SourceConfig(kind="imagefolder", image_root=str(tmp_path)))
    assert t.classes == ("cat", "dog", "eel")
    assert t.ids == ("cat/a.jpg", "cat/b.png", "dog/x/c.png", "eel/d.png")
    assert t.labels.tolist() == [0, 0, 1, 2]
    cfg = SourceConfig(kind="imagefolder", image_root=str(tmp_path), classes=("cat", "dog"))
    with pytest.raises(ValueError, match=r"class folder 'eel' is not in data\.source\.classes"):
        load_source(cfg)
    assert load_source(cfg, on_bad="skip").ids == ("cat/a.jpg", "cat/b.png", "dog/x/c.png")


def test_embedded_digits_long_tailed() -> None:
    t = load_source(SourceConfig(kind="embedded", embedded_imbalance=20.0), seed=0)
    assert t.classes == EMBEDDED_CLASSES and t.inline and t.image_format == "PNG"
    counts = np.bincount(t.labels, minlength=10)
    # digit 0 (178 images) is the head and keeps all; digit 9 keeps ceil(178 / 20) = 9
    assert counts[0] == 178 and counts[9] == 9
    assert (np.diff(counts) <= 0).all() and len(t) == counts.sum()
    assert len(set(t.ids)) == len(t) and t.groups == t.ids
    im = Image.open(io.BytesIO(t.images[0]))
    assert im.size == (8, 8) and im.mode == "RGB"
    again = load_source(SourceConfig(kind="embedded"), seed=0)
    assert again.ids == t.ids and again.images == t.images
    assert load_source(SourceConfig(kind="embedded"), seed=1).ids != t.ids


def test_fingerprints_local_change_with_content(tmp_path: Path) -> None:
    cfg = _write_set(tmp_path, ROWS)
    t = load_source(cfg)
    fp = fingerprints(t)
    assert fp[0] == "sha256:" + hashlib.sha256((tmp_path / "img" / "a1.png").read_bytes()).hexdigest()
    (tmp_path / "img" / "b2.png").write_bytes(_png(77))
    fp2 = fingerprints(load_source(cfg))
    assert fp2[0] == fp[0] and fp2[1] != fp[1]


def test_fingerprints_use_etag_without_reading() -> None:
    t = SourceTable(classes=("a",), ids=("x",), labels=np.zeros(1, dtype=np.int64), groups=("x",),
                    root="/nonexistent-root", paths=("x.jpg",), infos=({"size": 12, "ETag": '"abc"'},))
    assert fingerprints(t) == ["etag:abc:12"]
    inline = SourceTable(classes=("a",), ids=("x",), labels=np.zeros(1, dtype=np.int64), groups=("x",),
                         images=(b"123",))
    assert fingerprints(inline) == ["sha256:" + hashlib.sha256(b"123").hexdigest()]
