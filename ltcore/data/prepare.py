"""The prepare job on Ray Data: raw source -> validated, resized, split Parquet shards + ``manifest.json``.

Order of work, cheapest first, so that bad input fails before any cluster work:

1. storage checks: the output's bucket exists (pyarrow and s3fs do not create buckets);
2. :func:`ltcore.data.sources.load_source`: read the label table, check labels, ids, groups and that every
   image file exists (one listing of the image prefix);
3. optional long-tail subsampling (``imbalance_factor``) and ``limit``, then the group-aware stratified split;
4. content hash (:mod:`ltcore.data.manifest`); if ``<output>/<name>/<hash>/manifest.json`` exists the version is
   up to date and nothing is written;
5. Ray Data: one task per shard reads its images (fsspec: local, ``s3://`` ...), decodes, checks, resizes the
   shorter side to ``image_size`` (Pillow bicubic, antialiased when shrinking), re-encodes (JPEG quality 95;
   PNG for the embedded digits) and writes ``<split>/part-NNNNN.parquet``. Images never pass through the driver;
   it receives one small summary per shard;
6. ``manifest.json`` last, atomically: the commit point. Until it exists the version folder is invisible to
   readers; a failed run removes its shards, and a rerun clears a folder a crashed run left behind.

Shards are planned on the driver (``rows_per_shard`` per file, rows in a seeded hash order of their ids), so a
version's shard files and their contents are the same on every run and every storage backend, and every shard is
a random sample of its split: ids often encode the class (ImageFolder ``class/file``), and the ingest shuffles
within shards and a few blocks, so id-ordered shards would give single-class batches.

Why one module of ~400 lines: the driver's plan and the shard task it ships to Ray Data are one algorithm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ltcore import logs, storage
from ltcore.config import DataConfig, SourceConfig, check_config, to_dict
from ltcore.data import sampling, splits
from ltcore.data.manifest import Manifest, content_hash, manifest_uri, shard_uri, verify_shards, version_uri
from ltcore.data.sources import SourceTable, fingerprints, load_source
from ltcore.raystart import init_ray

logger = logging.getLogger("ltcore.data")
JPEG_QUALITY = 95
_KEY_SHARD_ORDER = 101  # row_uniforms key of the shard order (ingest uses keys below 100)
_READ_CHUNK = 64  # images fetched per request batch inside a shard task; bounds a task's memory


def prepare_dataset(
    cfg: DataConfig,
    *,
    progress: bool = True,
    s3: storage.S3Options | None = None,
    check_classes: Callable[[tuple[str, ...]], None] | None = None,
    previous: str | None = None,
) -> tuple[str, bool]:
    """Prepare (or find up to date) the dataset version described by ``cfg``.

    Args:
        cfg: the ``data`` section of the config.
        progress: print one line per phase (Ray Data shows its own progress bars per its ``DataContext``).
        s3: S3 endpoint/credentials; default: the process-wide ones (``storage.set_default_s3``, AWS variables).
        check_classes: called with the source's class names as soon as the source is read, before anything is
            written or any cluster work starts; raise to stop (e.g. a config value naming an unknown class).
        previous: manifest URI of an earlier version of this dataset to extend: groups it holds keep their split
            (a frozen test set across versions); only new groups are split, by the same seeded rule.

    Returns:
        ``(manifest URI, up_to_date)``; ``up_to_date`` is True when the version already existed and nothing was
        written.

    Raises:
        ValueError: bad config values or bad input (one line naming the file/row/class and what to do).
        storage.StorageError: an output or input URI that cannot be reached or written.
    """
    if progress:
        logs.setup()  # progress asked for: the lines reach stdout even where no entry script set logging up
    say: Callable[[str], None] = logger.info if progress else (lambda msg: None)
    t0 = time.monotonic()
    check_config(cfg, "data.")  # a section built in code has not been checked yet
    cfg = _resolved(cfg)
    out = cfg.output
    storage.check_bucket(out, s3)

    say(f"prepare {cfg.name!r}: reading source ({cfg.source.kind})")
    table = load_source(cfg.source, on_bad=cfg.on_bad, seed=cfg.seed, s3=s3)
    say(f"prepare: {len(table)} images, {len(table.classes)} classes, {len(table.skipped)} rows skipped")
    if check_classes is not None:
        check_classes(table.classes)
    _check_class_sizes(cfg, table)
    table = _subsample(cfg, table, say)

    fractions = {"train": cfg.split.train, "val": cfg.split.val, "test": cfg.split.test}
    fixed = fixed_splits(cfg, table, previous, s3)
    if fixed:
        parts = splits.extend_split(table.labels, table.groups, fractions, cfg.seed, fixed,
                                    num_classes=len(table.classes), class_names=table.classes)
        say(f"prepare: {len(fixed)} group(s) keep a fixed split (previous version / data.source.split_column)")
    else:
        parts = splits.group_stratified_split(table.labels, table.groups, fractions, cfg.seed,
                                              num_classes=len(table.classes), class_names=table.classes)
    split_of = np.empty(len(table), dtype=object)
    for s, idx in parts.items():
        split_of[idx] = s
    say("prepare: split " + ", ".join(f"{s} {len(idx)}" for s, idx in parts.items()))

    fps = fingerprints(table, s3=s3)
    prepare_config = to_dict(cfg)
    names = table.label_names()
    h = content_hash(prepare_config, table.classes,
                     zip(table.ids, names, table.groups, split_of.tolist(), fps), table.skipped)
    version = version_uri(out, cfg.name, h)
    m_uri = manifest_uri(version)
    if storage.exists(m_uri, s3):
        try:
            verify_shards(Manifest.load(m_uri, s3), m_uri, s3)
            say(f"dataset version {h} is up to date")
            return m_uri, True
        except ValueError as e:
            # Same content, same shards: rebuild the version; the manifest goes first, so it is never visible
            # over missing shards again.
            say(f"{e}: rebuilding it")
            storage.remove(m_uri, s3=s3)

    # No manifest: anything under the version folder is left from a crashed run; start clean, and find out that
    # the output is writable before starting cluster work.
    storage.remove(version, recursive=True, s3=s3)
    storage.check_writable(version, s3)

    items = _plan_shards(table, parts, version, cfg.rows_per_shard, cfg.seed)
    say(f"prepare: writing version {h} ({len(items)} shards) to {version}")
    try:
        results = _run_shards(cfg, table, items, s3)
        manifest = _manifest(cfg, table, h, prepare_config, results, list(parts))
    except BaseException:
        _discard(version, s3)
        raise
    storage.write_json(m_uri, manifest.to_dict(), s3)  # the commit point
    counts = ", ".join(f"{s} {manifest.num_rows(s)}" for s in manifest.splits)
    say(f"prepare: done in {time.monotonic() - t0:.1f} s ({counts}; {len(manifest.skipped)} skipped)")
    return m_uri, False


# ---------------------------------------------------------------------------------------------------------------
# driver side


def fixed_splits(cfg: DataConfig, table: SourceTable, previous: str | None,
                 s3: storage.S3Options | None = None) -> dict[str, str]:
    """Group -> split for the groups whose split is given: by ``source.split_column`` (non-empty cells), else by the
    ``previous`` dataset version (its shards' ``group`` column, read without the images).

    Raises:
        ValueError: a split column on a non-table source, an unknown split name, a group given two splits, or a
            previous version of another class list.
    """
    fixed: dict[str, str] = {}
    if cfg.source.split_column:
        if cfg.source.kind != "table":
            raise ValueError("data.source.split_column needs data.source.kind=table")
        names = ("train", "val", "test")
        for id_, group, split in zip(table.ids, table.groups, table.splits):
            if not split:
                continue
            if split not in names:
                raise ValueError(f"{cfg.source.split_column!r} of id {id_!r} is {split!r}; use one of "
                                 f"{', '.join(names)} or leave it empty")
            if fixed.setdefault(group, split) != split:
                raise ValueError(f"group {group!r} is in split {fixed[group]!r} and {split!r} "
                                 f"({cfg.source.split_column!r} of id {id_!r}): a group must stay in one split")
    if previous:
        import pyarrow.parquet as pq

        old = Manifest.load(previous, s3)
        if tuple(old.classes) != tuple(table.classes):
            raise ValueError(f"previous dataset version {previous!r} has classes {list(old.classes)}, the source "
                             f"has {list(table.classes)}: it cannot be extended; prepare without it")
        for split, uris in old.shards.items():
            for uri in uris:
                fs, path = storage.arrow_fs(uri, s3)
                for group in pq.read_table(path, columns=["group"], filesystem=fs).column("group").to_pylist():
                    fixed.setdefault(str(group), split)  # a split column wins over the previous version
    return fixed


def _check_class_sizes(cfg: DataConfig, table: SourceTable) -> None:
    """Every class has at least ``min_class_images`` images in the source (default: one per split)."""
    need = cfg.min_class_images or sum(1 for f in (cfg.split.train, cfg.split.val, cfg.split.test) if f > 0)
    counts = np.bincount(table.labels, minlength=len(table.classes))
    small = [k for k, n in enumerate(counts) if n < need]
    if not small:
        return
    k = min(small, key=lambda j: (counts[j], j))
    ids = [table.ids[i] for i in np.flatnonzero(table.labels == k)[:5]]
    where = f" (id {', '.join(map(repr, ids))})" if ids else ""
    more = f"; {len(small) - 1} more class(es) are as small" if len(small) > 1 else ""
    raise ValueError(f"class {table.classes[k]!r} has {counts[k]} image(s){where}, fewer than "
                     f"data.min_class_images={need}{more}: if it is a typo'd label, fix it; list the classes in "
                     "data.source.classes to catch unknown labels, or lower data.min_class_images")


def _resolved(cfg: DataConfig) -> DataConfig:
    """Local paths made absolute on the driver: Ray workers run in other working directories."""

    def norm(uri: str) -> str:
        return storage.normalize(uri) if uri else uri

    src: SourceConfig = dataclasses.replace(cfg.source, table=norm(cfg.source.table),
                                            image_root=norm(cfg.source.image_root))
    return dataclasses.replace(cfg, output=norm(cfg.output), source=src)


def _subsample(cfg: DataConfig, table: SourceTable, say: Callable[[str], None]) -> SourceTable:
    if cfg.imbalance_factor > 0:
        keep = splits.long_tail_subsample(table.labels, cfg.imbalance_factor, cfg.seed)
        table = table.take(keep)
        counts = np.bincount(table.labels, minlength=len(table.classes)).tolist()
        say(f"prepare: long-tail subsample at imbalance factor {cfg.imbalance_factor:g}: {len(table)} images "
            f"{counts}")
    if cfg.limit > 0 and cfg.limit < len(table):
        table = table.take(splits.stratified_limit(table.labels, cfg.limit, cfg.seed))
        say(f"prepare: limited to {len(table)} images")
    return table


def _plan_shards(table: SourceTable, parts: dict[str, np.ndarray], version: str, per: int,
                 seed: int) -> list[dict[str, Any]]:
    """One item per shard: which rows go into which file; a split's rows in a seeded hash order of their ids."""
    items: list[dict[str, Any]] = []
    for split, idx in parts.items():
        keys = sampling.row_uniforms(sampling.id_keys([table.ids[i] for i in idx]), seed, 0, _KEY_SHARD_ORDER)
        idx = idx[np.argsort(keys, kind="stable")]
        for k, start in enumerate(range(0, len(idx), per)):
            chunk = idx[start : start + per]
            rows = [[table.ids[i], table.paths[i] if table.paths else "", int(table.labels[i]), table.groups[i]]
                    for i in chunk]
            items.append({
                "split": split,
                "shard": k,
                "uri": shard_uri(version, split, k),
                "rows": json.dumps(rows),
                "images": [table.images[i] for i in chunk] if table.inline else [],
            })
    return items


def _run_shards(cfg: DataConfig, table: SourceTable, items: list[dict[str, Any]],
                s3: storage.S3Options | None) -> list[dict[str, Any]]:
    init_ray()  # only now that there is work: joins RAY_ADDRESS when set, else starts a fresh local Ray
    import ray

    kwargs = {
        "root": table.root,
        "image_size": cfg.image_size,
        "image_format": table.image_format,
        "on_bad": cfg.on_bad,
        "num_classes": len(table.classes),
        # resolved here so that workers use the driver's endpoint whatever their environment holds
        "s3": (s3 or storage.S3Options()).resolved(),
    }
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block, hence one task, per shard
    results = ds.map(process_shard, fn_kwargs=kwargs).take_all()  # type: ignore[arg-type]
    failed = [r for r in results if r.get("error")]
    if failed:  # nothing is committed: the caller discards the shards
        more = f" (and {len(failed) - 1} more shards)" if len(failed) > 1 else ""
        raise storage.StorageError(f"prepare stopped, no dataset version written: {failed[0]['error']}{more}; "
                                   "rerun the same command once the storage is reachable")
    return sorted(results, key=lambda r: (r["split"], int(r["shard"])))


def _manifest(cfg: DataConfig, table: SourceTable, h: str, prepare_config: dict[str, Any],
              results: list[dict[str, Any]], split_names: list[str]) -> Manifest:
    bad = sorted((b for r in results for b in json.loads(r["bad"])), key=lambda b: b["id"])
    if bad and cfg.on_bad == "fail":
        b = bad[0]
        raise ValueError(f"image {b['uri']!r} (id {b['id']!r}) {b['reason']}; fix or remove it, or set "
                         f"data.on_bad=skip to skip bad images ({len(bad)} bad image(s) found so far)")
    c = len(table.classes)
    counts = {s: np.zeros(c, dtype=np.int64) for s in split_names}
    shards: dict[str, list[str]] = {s: [] for s in split_names}
    sizes: dict[str, int] = {}
    for r in results:
        counts[r["split"]] += np.asarray(json.loads(r["counts"]), dtype=np.int64)
        if int(r["n"]) > 0:
            shards[r["split"]].append(r["uri"])
            sizes[r["uri"]] = int(r["size"])
    total = int(sum(v.sum() for v in counts.values()))
    if total == 0:
        raise ValueError(f"dataset is empty: all {len(table)} images were skipped as undecodable; check the images")
    for k, name in enumerate(table.classes):
        if counts["train"][k] == 0:
            raise ValueError(f"class {name!r} has no training images after skipping bad images; fix the images "
                             "or drop the class")
    skipped = sorted([*table.skipped, *({"id": b["id"], "reason": b["reason"]} for b in bad)],
                     key=lambda s: s["id"])
    return Manifest(
        name=cfg.name,
        hash=h,
        classes=tuple(table.classes),
        counts={s: {name: int(v[k]) for k, name in enumerate(table.classes)} for s, v in counts.items()},
        group_column=table.group_column,
        image_size=cfg.image_size,
        shards={s: sorted(u) for s, u in shards.items()},
        skipped=skipped,
        prepare_config=prepare_config,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        shard_sizes=sizes,
    )


def _discard(version: str, s3: storage.S3Options | None) -> None:
    """Best effort: remove a failed run's shards (they are invisible anyway without a manifest)."""
    with contextlib.suppress(Exception):  # the original error is the one to report
        storage.remove(version, recursive=True, s3=s3)
        if storage.is_local(version):  # and the folders made for it, where nothing else is in them
            for folder in (storage.local_path(version), os.path.dirname(storage.local_path(version))):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


# ---------------------------------------------------------------------------------------------------------------
# worker side (runs inside Ray Data tasks)


def resize_encode(data: bytes, image_size: int, image_format: str) -> bytes:
    """Decode ``data``, convert to RGB, resize so the shorter side is ``image_size``, encode as JPEG/PNG.

    Raises whatever Pillow raises for undecodable or truncated data (the caller turns it into a bad row).
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # full decode: truncated files fail here, not later in training
        img = ImageOps.exif_transpose(im)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale (X-ray PNGs): convert("RGB") would clip to 255; stretch min..max to 0..255
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.rint(arr).astype(np.uint8))
    img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        # Pillow's resize widens the filter support when shrinking, so downscaling is area-correct (antialiased)
        img = img.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if image_format == "PNG":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _fetch(fs: Any, paths: list[str]) -> list[bytes | BaseException]:
    """Bytes of each path (or the exception reading it); one batched request where the filesystem has one."""
    try:
        got = fs.cat(paths, on_error="return") if len(paths) > 1 else {}
    except Exception:  # fall back to one request per file below
        got = {}
    out: list[bytes | BaseException] = []
    for p in paths:
        v = got.get(p)
        if v is None:
            try:
                v = fs.cat_file(p)
            except Exception as e:
                v = e
        out.append(v)
    return out


def process_shard(item: dict[str, Any], *, root: str, image_size: int, image_format: str, on_bad: str,
                  num_classes: int, s3: storage.S3Options) -> dict[str, Any]:
    """Ray Data ``map`` function: read, check, resize and encode one shard's images and write its Parquet file.

    Returns a small summary row: ``split``, ``shard``, ``uri``, ``n`` (rows written), ``counts`` (JSON list of
    per-class counts, ``(C,)``) and ``bad`` (JSON list of ``{id, uri, reason}``). Under ``on_bad="fail"`` the task
    stops at its first bad image and writes nothing; the driver raises.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = json.loads(item["rows"])
    inline = list(item["images"]) if len(item["images"]) else None
    fs = fs_root = None
    if inline is None:
        fs, fs_root = storage.fsspec_fs(root, s3)
    ids: list[str] = []
    images: list[bytes] = []
    labels: list[int] = []
    groups: list[str] = []
    bad: list[dict[str, str]] = []
    for start in range(0, len(rows), _READ_CHUNK):
        part = rows[start : start + _READ_CHUNK]
        if inline is not None:
            datas: list[bytes | BaseException] = [bytes(b) for b in inline[start : start + _READ_CHUNK]]
        else:
            datas = _fetch(fs, [posixpath.normpath(posixpath.join(str(fs_root), r[1])) for r in part])
        for (id_, rel, label, group), data in zip(part, datas):
            where = storage.join(root, rel) if rel else id_
            if isinstance(data, BaseException):
                reason = f"cannot be read ({type(data).__name__}: {_first_line(data)})"
            else:
                try:
                    images.append(resize_encode(data, image_size, image_format))
                    ids.append(id_)
                    labels.append(int(label))
                    groups.append(group)
                    continue
                except Exception as e:  # Pillow raises many types for bad files
                    reason = f"cannot be decoded ({type(e).__name__}: {_first_line(e)})"
            bad.append({"id": id_, "uri": where, "reason": reason})
            if on_bad == "fail":
                return _summary(item, 0, [0] * num_classes, bad)
    size = 0
    if ids:
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "image": pa.array(images, pa.binary()),
                "label": pa.array(labels, pa.int32()),
                "group": pa.array(groups, pa.string()),
            }
        )
        # Serialised in memory and written with one atomic storage.write_bytes (temp file + rename locally, a
        # single PUT on object stores up to s3fs's block size) rather than through pyarrow's S3 output stream,
        # which always uses multipart uploads.
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        try:
            storage.write_bytes(item["uri"], data, s3)
        except storage.StorageError as e:  # returned, not raised: Ray Data's wrapper would keep only its traceback
            return _summary(item, 0, [0] * num_classes, bad) | {"error": str(e)}
        size = len(data)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
    return _summary(item, len(ids), counts, bad, size)


def _summary(item: dict[str, Any], n: int, counts: list[int], bad: list[dict[str, str]],
             size: int = 0) -> dict[str, Any]:
    return {"split": item["split"], "shard": int(item["shard"]), "uri": item["uri"], "n": n,
            "counts": json.dumps(counts), "bad": json.dumps(bad), "size": size, "error": ""}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no detail"
