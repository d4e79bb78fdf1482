"""Dataset version: ``manifest.json`` (classes, counts, shards, provenance) and its content hash.

Layout of one version, written by :mod:`ltcore.data.prepare` and read by everything downstream::

    <output>/<name>/<hash>/train/part-00000.parquet   (also val/, test/)
    <output>/<name>/<hash>/manifest.json              written last: the commit point

Parquet shard schema (the contract with ingest): ``id`` string, ``image`` binary (encoded JPEG, quality 95, for
photos; PNG for the embedded digits), ``label`` int32 (index into ``classes``), ``group`` string.

Content hash: sha256 over the prepare config without its locations (``output``, ``source.table``,
``source.image_root``: the same data prepared from or to another place is the same version), the class list,
and the sorted rows ``(id, label name, group, split, fingerprint)`` of the images that go into the version,
plus the rows skipped before decoding. The fingerprint of an image is computed by
:func:`ltcore.data.sources.fingerprints`: the object store's ETag and size where the listing has one (S3's ETag
is the MD5 of the content for single-part uploads, free from the listing), otherwise the sha256 of the file's
bytes. Modification times are never used, so touching or copying files does not create a new version, and
changing one image's bytes does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ltcore import storage

FORMAT_VERSION = 1
# Bump when the prepare algorithm changes what it writes for the same inputs (resize, encoding, split rule),
# so old versions are not mistaken for up to date.
# 2: rows are spread over a split's shards in a seeded hash order of their ids (1: id order, which put a class
# per shard for ImageFolder ids "class/file").
PREPARE_ALGORITHM = 2
SHARD_COLUMNS = ("id", "image", "label", "group")
MANIFEST_NAME = "manifest.json"
# config keys that say where data lives, not what it is
_LOCATION_KEYS = (("output",), ("source", "table"), ("source", "image_root"))


@dataclass(frozen=True)
class Manifest:
    """One dataset version. ``counts[split][class]`` is the number of images; ``shards[split]`` their URIs."""

    name: str
    hash: str
    classes: tuple[str, ...]
    counts: dict[str, dict[str, int]]
    image_size: int
    shards: dict[str, list[str]]
    group_column: str = ""  # source column whose values never cross splits; "" = each image is its own group
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{"id", "reason"}] under on_bad=skip
    prepare_config: dict[str, Any] = field(default_factory=dict)
    created: str = ""  # ISO 8601 UTC
    shard_sizes: dict[str, int] = field(default_factory=dict)  # shard URI -> bytes (checked when a version is reused)
    format_version: int = FORMAT_VERSION

    @property
    def splits(self) -> list[str]:
        return list(self.counts)

    def class_counts(self, split: str) -> list[int]:
        """Image counts of ``split`` in class order, ``(C,)``."""
        if split not in self.counts:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; splits: {', '.join(self.counts)}")
        per = self.counts[split]
        return [int(per.get(c, 0)) for c in self.classes]

    def num_rows(self, split: str) -> int:
        return sum(self.class_counts(split))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        version = int(d.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise ValueError(f"manifest format {version} is newer than this ltcore reads ({FORMAT_VERSION}); "
                             "upgrade ltcore")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("name", "hash", "classes", "counts", "image_size", "shards") if k not in d]
        if missing:
            raise ValueError(f"manifest lacks the field(s) {', '.join(missing)}; it was not written by prepare")
        kw = {k: v for k, v in d.items() if k in names}
        kw["classes"] = tuple(kw["classes"])
        kw["counts"] = {s: {c: int(n) for c, n in per.items()} for s, per in kw["counts"].items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, uri: str, s3: storage.S3Options | None = None) -> Manifest:
        """Read a manifest from a URI (the file itself, or its version folder)."""
        if not uri.rstrip("/").endswith(".json"):
            uri = storage.join(uri, MANIFEST_NAME)
        try:
            text = storage.read_text(uri, s3)
        except storage.StorageError as e:
            raise storage.StorageError(f"dataset manifest: {e}; run prepare first or check the URI") from None
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"{uri}: {e}") from None


def verify_shards(manifest: Manifest, uri: str, s3: storage.S3Options | None = None) -> None:
    """Check that every shard the manifest lists is there, with the size it was written with (one listing per
    split folder, no shard is read).

    Raises:
        ValueError: a shard is missing or has another size (one line naming it and how many more).
    """
    bad: list[str] = []
    listings: dict[str, dict[str, Any]] = {}
    for shard in (u for split in manifest.splits for u in manifest.shards.get(split, [])):
        fs, path = storage.fsspec_fs(shard, s3)
        folder = path.rsplit("/", 1)[0]
        if folder not in listings:
            try:
                listings[folder] = {str(p).rstrip("/"): i for p, i in fs.find(folder, detail=True).items()}
            except FileNotFoundError:
                listings[folder] = {}
            except Exception as e:
                raise storage.StorageError(f"cannot list the shards of dataset {uri!r}: {type(e).__name__}: "
                                           f"{e}") from None
        info = listings[folder].get(path.rstrip("/"))
        want = manifest.shard_sizes.get(shard)
        if info is None:
            bad.append(f"{shard} is missing")
        elif want is not None and int(info.get("size", -1)) != int(want):
            bad.append(f"{shard} has {info.get('size')} bytes, {want} were written")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"dataset version {uri!r} is damaged: {bad[0]}{more}; prepare it again (rerun "
                         "prepare_data.py with its config: a damaged version is rebuilt) or restore the files")


def version_uri(output: str, name: str, content_hash: str) -> str:
    """``<output>/<name>/<hash>``: the folder of one dataset version."""
    return storage.join(output, name, content_hash)


def manifest_uri(version: str) -> str:
    return storage.join(version, MANIFEST_NAME)


def shard_uri(version: str, split: str, index: int) -> str:
    return storage.join(version, split, f"part-{index:05d}.parquet")


def hashable_config(prepare_config: Mapping[str, Any]) -> dict[str, Any]:
    """The prepare config (as ``ltcore.config.to_dict`` gives it) without the keys that only say where data is."""
    cfg = json.loads(json.dumps(prepare_config))  # deep copy, and fails early on values JSON cannot hold
    for path in _LOCATION_KEYS:
        node = cfg
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return cfg  # type: ignore[no-any-return]


def content_hash(
    prepare_config: Mapping[str, Any],
    classes: Iterable[str],
    rows: Iterable[tuple[str, str, str, str, str]],
    skipped: Iterable[Mapping[str, str]] = (),
) -> str:
    """sha256 hex digest identifying a dataset version (see the module docstring).

    Args:
        prepare_config: the full prepare config as a dict; location keys are dropped here.
        classes: class names in order.
        rows: ``(id, label name, group, split, fingerprint)`` per image; order does not matter.
        skipped: rows dropped before decoding, ``{"id", "reason"}``.
    """
    h = hashlib.sha256()
    header = {
        "format": FORMAT_VERSION,
        "algorithm": PREPARE_ALGORITHM,
        "config": hashable_config(prepare_config),
        "classes": list(classes),
        "skipped": sorted((str(s["id"]), str(s["reason"])) for s in skipped),
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    for row in sorted(tuple(str(x) for x in r) for r in rows):
        # \x1f / \x1e (unit / record separators) cannot be confused with characters inside ids or paths
        h.update(("\x1f".join(row) + "\x1e").encode())
    return h.hexdigest()
