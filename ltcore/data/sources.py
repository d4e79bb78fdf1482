"""Raw image sources -> one validated table of rows ``(id, image file or inline bytes, label, group)``.

Three kinds, all set by :class:`ltcore.config.SourceConfig`, no code per dataset:

- ``table``: a CSV or Parquet label table plus an image prefix. One label column (HAM10000: ``image_id``,
  ``dx``, ``lesion_id``) or one-hot label columns (ISIC 2019: ``MEL, NV, BCC, ...``). The image of a row is
  ``image_root / path_template.format(id=<id>, **<row>)``.
- ``imagefolder``: ``image_root/<class>/<any/sub/path>.<image extension>``, classes = sorted folder names.
- ``embedded``: scikit-learn's bundled digits (1,797 real 8 x 8 images, no download), made long-tailed with the
  LMD construction; images are 8 x 8 grey PNGs stored RGB, upscaled later by prepare.

Validation happens here, before any cluster work: missing or unknown labels, duplicate ids, missing group
values, and missing image files (one recursive listing of the image prefix, no per-file requests). Under
``on_bad="fail"`` the first problem is a one-line :class:`ValueError` naming the row and what to do; under
``on_bad="skip"`` the row is dropped and listed in :attr:`SourceTable.skipped`. Undecodable images are found
by prepare, which decodes them anyway.

Rows come back sorted by id, so the result does not depend on the row order of the table.

Why one long module: the three source kinds share the row checks (labels, ids, groups, images) that make one
validated table; each kind alone is short.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import string
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from ltcore import storage
from ltcore.config import SourceConfig
from ltcore.data import splits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
EMBEDDED_CLASSES = tuple(str(d) for d in range(10))

OnBad = Literal["fail", "skip"]


@dataclass(frozen=True, eq=False)
class SourceTable:
    """Validated rows of a source, sorted by id. Per-row fields are ``(N,)`` sequences."""

    classes: tuple[str, ...]
    ids: tuple[str, ...]
    labels: np.ndarray  # (N,) int64, index into classes
    groups: tuple[str, ...]
    root: str = ""  # image root URI; "" when images are inline
    paths: tuple[str, ...] = ()  # (N,) file paths under root ('/'-separated); empty when inline
    images: tuple[bytes, ...] = ()  # (N,) encoded images when inline (embedded); empty otherwise
    infos: tuple[dict[str, Any], ...] = ()  # (N,) listing info per file (size, ETag ...); empty when inline
    skipped: tuple[dict[str, str], ...] = ()  # rows dropped under on_bad=skip: {"id", "reason"}
    group_column: str = ""
    image_format: Literal["JPEG", "PNG"] = "JPEG"  # how prepare re-encodes: JPEG for photos, PNG for digits
    splits: tuple[str, ...] = ()  # (N,) predefined split per row (source.split_column; "" = not given); or empty

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def inline(self) -> bool:
        return bool(self.images)

    def uri(self, i: int) -> str:
        return storage.join(self.root, self.paths[i])

    def label_names(self) -> list[str]:
        return [self.classes[int(k)] for k in self.labels]

    def rows(self) -> Iterator[tuple[str, str | bytes, str, str]]:
        """``(id, image URI or inline bytes, label name, group)`` per row."""
        for i, id_ in enumerate(self.ids):
            img: str | bytes = self.images[i] if self.inline else self.uri(i)
            yield id_, img, self.classes[int(self.labels[i])], self.groups[i]

    def take(self, indices: Sequence[int] | np.ndarray) -> SourceTable:
        """The rows at ``indices`` (kept in the given order); classes and skipped stay."""
        idx = [int(i) for i in indices]
        return replace(
            self,
            ids=tuple(self.ids[i] for i in idx),
            labels=self.labels[np.asarray(idx, dtype=np.int64)] if idx else np.zeros(0, dtype=np.int64),
            groups=tuple(self.groups[i] for i in idx),
            paths=tuple(self.paths[i] for i in idx) if self.paths else (),
            images=tuple(self.images[i] for i in idx) if self.images else (),
            infos=tuple(self.infos[i] for i in idx) if self.infos else (),
            splits=tuple(self.splits[i] for i in idx) if self.splits else (),
        )


def load_source(
    source: SourceConfig,
    *,
    on_bad: OnBad = "fail",
    seed: int = 0,
    s3: storage.S3Options | None = None,
) -> SourceTable:
    """Read and validate a source (see the module docstring). ``seed`` only matters for the embedded set.

    Raises:
        ValueError: a bad row under ``on_bad="fail"`` (one line naming the row), a missing column, an empty result.
        storage.StorageError: the table or image prefix cannot be read.
    """
    if on_bad not in ("fail", "skip"):
        raise ValueError(f"on_bad must be 'fail' or 'skip', got {on_bad!r}")
    if source.kind == "embedded":
        table = _load_embedded(source, seed=seed)
    elif source.kind == "table":
        table = _load_table(source, on_bad=on_bad, s3=s3)
    elif source.kind == "imagefolder":
        table = _load_imagefolder(source, on_bad=on_bad, s3=s3)
    else:
        raise ValueError(f"source kind {source.kind!r} is not one of embedded, table, imagefolder")
    if len(table) == 0:
        where = source.table or source.image_root or "the embedded set"
        raise ValueError(f"dataset is empty: no usable rows in {where} ({len(table.skipped)} skipped); "
                         "check the source and the on_bad policy")
    return table


# ---------------------------------------------------------------------------------------------------------------
# bad-row bookkeeping


class _Bad:
    """Collects bad rows: raises at once under fail, records them under skip."""

    def __init__(self, on_bad: OnBad, where: str) -> None:
        self.on_bad = on_bad
        self.where = where
        self.skipped: list[dict[str, str]] = []

    def rows(self, ids: Sequence[str], positions: Sequence[int], reasons: Sequence[str], hint: str) -> None:
        """Report bad rows (``positions``: 0-based data rows of the table, for the message)."""
        if not len(ids):
            return
        if self.on_bad == "fail":
            more = f" ({len(ids)} such rows)" if len(ids) > 1 else ""
            raise ValueError(f"{self.where}: row {positions[0] + 1} (id {ids[0]!r}): {reasons[0]}{more}; "
                             f"{hint}, or set data.on_bad=skip to skip such rows")
        self.skipped.extend({"id": str(i), "reason": r} for i, r in zip(ids, reasons))


# ---------------------------------------------------------------------------------------------------------------
# label table


def _read_table(uri: str, s3: storage.S3Options | None) -> Any:
    import pandas as pd

    low = uri.lower()
    try:
        if low.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            fs, path = storage.arrow_fs(uri, s3)
            try:
                df = pq.read_table(path, filesystem=fs).to_pandas()
            except FileNotFoundError:
                raise storage.StorageError(f"{uri!r} does not exist") from None
            return df.astype(object).where(df.notna(), None)
        with storage.open_file(uri, "rb", s3) as f:
            # every column as text; only empty cells are missing ("NA" may be a real label or id)
            return pd.read_csv(f, dtype=str, keep_default_na=False, na_values=[""],
                               sep="\t" if low.endswith((".tsv", ".tsv.gz")) else ",",
                               compression="gzip" if low.endswith(".gz") else None)
    except storage.StorageError as e:
        raise storage.StorageError(f"label table (data.source.table): {e}") from None
    except (ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"label table {uri!r} cannot be parsed: {first}") from None


def _text(v: Any) -> str:
    """A cell as stripped text; missing (None/NaN) -> ''."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v).strip()


def _check_columns(df: Any, needed: dict[str, str], where: str) -> None:
    for col, key in needed.items():
        if col not in df.columns:
            shown = ", ".join(map(str, df.columns[:20]))
            raise ValueError(f"{where}: column {col!r} ({key}) is not in the table; its columns are: {shown}")


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _load_table(source: SourceConfig, *, on_bad: OnBad, s3: storage.S3Options | None) -> SourceTable:
    if not source.table:
        raise ValueError("data.source.table is empty; set it to the URI of a CSV or Parquet label table")
    where = f"label table {source.table!r}"
    df = _read_table(source.table, s3)
    one_hot = bool(source.label_columns)
    needed = {source.id_column: "data.source.id_column"}
    if one_hot:
        needed.update({c: "data.source.label_columns" for c in source.label_columns})
    else:
        needed[source.label_column] = "data.source.label_column"
    if source.group_column:
        needed[source.group_column] = "data.source.group_column"
    if source.split_column:
        needed[source.split_column] = "data.source.split_column"
    fields = [f for f in _template_fields(source.path_template) if f != "id"]
    needed.update({f: "used in data.source.path_template" for f in fields})
    _check_columns(df, needed, where)

    n = len(df)
    bad = _Bad(on_bad, where)
    ids = [_text(v) for v in df[source.id_column].tolist()]
    ok = np.ones(n, dtype=bool)

    def report(mask: np.ndarray, reasons: list[str] | str, hint: str) -> None:
        pos = np.flatnonzero(mask & ok)
        rs = [reasons] * len(pos) if isinstance(reasons, str) else [reasons[i] for i in pos]
        bad.rows([ids[i] for i in pos], pos.tolist(), rs, hint)
        ok[pos] = False

    report(np.array([i == "" for i in ids], dtype=bool), f"empty {source.id_column!r}", "give every row an id")

    # duplicates: the first occurrence stays (under skip), later ones are the bad rows
    first_at: dict[str, int] = {}
    dup = np.zeros(n, dtype=bool)
    dup_reason = [""] * n
    for i, id_ in enumerate(ids):
        if not ok[i]:
            continue
        if id_ in first_at:
            dup[i] = True
            dup_reason[i] = f"duplicate id (first at row {first_at[id_] + 1})"
        else:
            first_at[id_] = i
    report(dup, dup_reason, "make ids unique")

    # labels
    if one_hot:
        import pandas as pd

        cols = list(source.label_columns)
        vals = np.stack([pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) for c in cols], axis=1)
        is_one = vals == 1
        valid = np.isin(vals, (0.0, 1.0))
        n_ones = is_one.sum(axis=1)
        not_binary = np.asarray(~valid.all(axis=1), dtype=bool)
        reasons = ["one-hot label columns hold values other than 0 and 1" if nb else
                   f"{k} of the one-hot label columns are 1 (need exactly one)"
                   for nb, k in zip(not_binary.tolist(), n_ones.tolist())]
        report(not_binary | (n_ones != 1), reasons, "fix the one-hot columns " + ", ".join(cols))
        label_text = [cols[int(np.argmax(r))] if k == 1 else "" for r, k in zip(is_one, n_ones)]
        default_classes = tuple(cols)  # the column order is the published class order
    else:
        label_text = [_text(v) for v in df[source.label_column].tolist()]
        report(np.array([t == "" for t in label_text], dtype=bool), f"no label in {source.label_column!r}",
               "give every row a label")
        default_classes = tuple(sorted({t for t, o in zip(label_text, ok) if o}))
    classes = tuple(source.classes) or default_classes
    index = {c: k for k, c in enumerate(classes)}
    unknown = np.array([t not in index for t in label_text], dtype=bool)
    shown = ", ".join(classes[:12]) + (" ..." if len(classes) > 12 else "")
    report(unknown, [f"label {t!r} is not a known class ({shown})" for t in label_text],
           "fix the label or list it in data.source.classes")

    # groups
    if source.group_column:
        groups = [_text(v) for v in df[source.group_column].tolist()]
        report(np.array([gr == "" for gr in groups], dtype=bool), f"empty group {source.group_column!r}",
               "give every row a group (the patient / lesion id), or clear data.source.group_column")
    else:
        groups = list(ids)

    # image files: one listing of the prefix, compared with the expected paths
    root = source.image_root or posixpath.dirname(source.table.rstrip("/")) or "."
    extra = {f: df[f].tolist() for f in fields}
    rel = [""] * n
    for i in np.flatnonzero(ok).tolist():
        try:
            rel[i] = source.path_template.format(id=ids[i], **{f: _text(extra[f][i]) for f in fields})
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"data.source.path_template {source.path_template!r} cannot be filled: {e}") from None
    listing = _list_files(root, s3)
    fs_root = _fs_root(root, s3)
    full = [_under(fs_root, r) for r in rel]
    missing = np.array([o and p not in listing for p, o in zip(full, ok)], dtype=bool)
    if missing.any() and on_bad == "fail" and not listing:
        raise ValueError(f"image prefix {root!r} (data.source.image_root) holds no files; check the URI")
    report(missing, [f"image file {storage.join(root, r)!r} does not exist" for r in rel],
           "add the file or remove the row")

    keep = sorted(np.flatnonzero(ok).tolist(), key=lambda i: ids[i])
    return SourceTable(
        classes=classes,
        ids=tuple(ids[i] for i in keep),
        labels=np.array([index[label_text[i]] for i in keep], dtype=np.int64),
        groups=tuple(groups[i] for i in keep),
        root=root,
        paths=tuple(rel[i] for i in keep),
        infos=tuple(listing[full[i]] for i in keep),
        skipped=tuple(bad.skipped),
        group_column=source.group_column,
        splits=tuple(_text(df[source.split_column].iloc[i]) for i in keep) if source.split_column else (),
    )


# ---------------------------------------------------------------------------------------------------------------
# listing


def _fs_root(root: str, s3: storage.S3Options | None) -> str:
    _, path = storage.fsspec_fs(root, s3)
    return path.rstrip("/") or "/"


def _under(fs_root: str, rel: str) -> str:
    return posixpath.normpath(posixpath.join(fs_root, rel))


def _list_files(root: str, s3: storage.S3Options | None) -> dict[str, dict[str, Any]]:
    """fs path -> info of every file under ``root`` (one recursive listing)."""
    fs, path = storage.fsspec_fs(root, s3)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as e:  # unreachable store, no permission ...: one user-facing message
        raise storage.StorageError(f"cannot list image prefix {root!r}: {type(e).__name__}: {e}") from None
    out: dict[str, dict[str, Any]] = {}
    for p, info in found.items():
        if info.get("type", "file") != "file":
            continue
        keep = {k: info[k] for k in ("size", "ETag", "etag", "md5Hash") if k in info}
        out[posixpath.normpath(p)] = keep
    return out


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder


def _load_imagefolder(source: SourceConfig, *, on_bad: OnBad, s3: storage.S3Options | None) -> SourceTable:
    if not source.image_root:
        raise ValueError("data.source.image_root is empty; set it to the folder that holds one folder per class")
    if source.group_column:
        raise ValueError("data.source.group_column is only for kind=table; ImageFolder images are their own groups")
    root = source.image_root
    where = f"image folder {root!r}"
    fs_root = _fs_root(root, s3)
    listing = _list_files(root, s3)
    files: list[tuple[str, str]] = []  # (relative path, class folder)
    for p in listing:
        rel = posixpath.relpath(p, fs_root)
        if "/" not in rel or not rel.lower().endswith(IMAGE_EXTENSIONS):
            continue  # files at the top level and non-images (README, .DS_Store) are not samples
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        files.append((rel, rel.split("/", 1)[0]))
    if not files:
        raise ValueError(f"{where} holds no images in class folders; expected <root>/<class>/<image>")
    files.sort()
    if not source.classes:
        # A class folder without images would silently drop out of the class list.
        with_images = {c for _, c in files}
        try:
            entries = storage.fsspec_fs(root, s3)[0].ls(fs_root, detail=True)
        except Exception:
            entries = []
        empty = sorted(name for e in entries if e.get("type") == "directory"
                       and not (name := posixpath.basename(str(e["name"]).rstrip("/"))).startswith(".")
                       and name not in with_images)
        if empty:
            raise ValueError(f"{where}: class folder {empty[0]!r} holds no images"
                             f"{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}; add images, remove "
                             "the folder, or list the classes to use in data.source.classes")
    classes = tuple(source.classes) or tuple(sorted({c for _, c in files}))
    index = {c: k for k, c in enumerate(classes)}
    bad = _Bad(on_bad, where)
    unknown = [(i, rel) for i, (rel, c) in enumerate(files) if c not in index]
    bad.rows([r for _, r in unknown], [i for i, _ in unknown],
             [f"class folder {rel.split('/', 1)[0]!r} is not in data.source.classes" for _, rel in unknown],
             "add the class to data.source.classes or remove the folder")
    kept = [(rel, c) for rel, c in files if c in index]
    return SourceTable(
        classes=classes,
        ids=tuple(rel for rel, _ in kept),
        labels=np.array([index[c] for _, c in kept], dtype=np.int64),
        groups=tuple(rel for rel, _ in kept),
        root=root,
        paths=tuple(rel for rel, _ in kept),
        infos=tuple(listing[_under(fs_root, rel)] for rel, _ in kept),
        skipped=tuple(bad.skipped),
    )


# ---------------------------------------------------------------------------------------------------------------
# embedded digits


def _load_embedded(source: SourceConfig, *, seed: int) -> SourceTable:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()  # bundled with scikit-learn: (1797, 8, 8) in 0..16
    if source.classes and tuple(source.classes) != EMBEDDED_CLASSES:
        raise ValueError(f"data.source.classes must be empty or {list(EMBEDDED_CLASSES)} for the embedded digits")
    y = digits.target.astype(np.int64)
    # digit 0 is the head and 9 the tail: a fixed, readable order (the counts are nearly equal, 174..183)
    keep = splits.long_tail_subsample(y, source.embedded_imbalance, seed, order=list(range(10)))
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    images = []
    for i in keep:
        buf = io.BytesIO()
        Image.fromarray(pixels[i]).convert("RGB").save(buf, format="PNG")  # uint8 (8, 8) is read as grey "L"
        images.append(buf.getvalue())
    ids = tuple(f"digit-{int(i):04d}" for i in keep)
    return SourceTable(
        classes=EMBEDDED_CLASSES,
        ids=ids,
        labels=y[keep],
        groups=ids,  # one image per writer sample: each image is its own group
        images=tuple(images),
        image_format="PNG",
    )


# ---------------------------------------------------------------------------------------------------------------
# content fingerprints


def fingerprints(table: SourceTable, *, s3: storage.S3Options | None = None, threads: int = 8) -> list[str]:
    """A content fingerprint per row, for the dataset version hash (``(N,)`` strings).

    Inline images: sha256 of the bytes. Files whose listing carries a content checksum (S3 ``ETag``, GCS
    ``md5Hash``): that checksum plus the size, no read. Other files (local disks): sha256 of the bytes, read with
    ``threads`` threads (HAM10000's 54 MB take about a second). Modification times are not used.
    """
    if table.inline:
        return ["sha256:" + hashlib.sha256(b).hexdigest() for b in table.images]
    out: list[str | None] = [None] * len(table)
    to_read: list[int] = []
    for i, info in enumerate(table.infos):
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        if tag:
            out[i] = f"etag:{str(tag).strip(chr(34))}:{info.get('size', '')}"
        else:
            to_read.append(i)
    if to_read:
        fs, _ = storage.fsspec_fs(table.root, s3)
        fs_root = _fs_root(table.root, s3)

        def digest(i: int) -> str:
            h = hashlib.sha256()
            try:
                with fs.open(_under(fs_root, table.paths[i]), "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            except OSError as e:
                raise storage.StorageError(f"cannot read {table.uri(i)!r}: {e}") from None
            return "sha256:" + h.hexdigest()

        workers = max(1, min(threads, len(to_read), (os.cpu_count() or 1) * 4))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, d in zip(to_read, pool.map(digest, to_read)):
                out[i] = d
    return [str(x) for x in out]
