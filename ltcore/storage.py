"""One place that turns a URI into filesystem objects, and writes files atomically.

URIs: ``/plain/path``, ``relative/path``, ``file://``, ``s3://bucket/key``, ``memory://``, and anything
else fsspec knows. S3 endpoint and credentials come from :class:`S3Options` (config) or the standard
AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``). Ray Data and pyarrow get a ``pyarrow.fs.FileSystem``; everything else uses fsspec.

Atomicity: local files are written to a temporary name in the same folder and renamed; an object store
PUT is atomic per object. Multi-file outputs (dataset versions, runs) write their parts first and a
small commit file (``manifest.json``) last, so a crash leaves no visible half output.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A URI that cannot be read, reached or written."""


@dataclass(frozen=True)
class S3Options:
    """S3 connection settings; empty fields fall back to the standard AWS environment variables."""

    endpoint_url: str = ""
    access_key: str = ""
    secret_key: str = ""
    region: str = ""

    def resolved(self) -> S3Options:
        env = os.environ
        return S3Options(
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3", "") or env.get("AWS_ENDPOINT_URL", ""),
            access_key=self.access_key or env.get("AWS_ACCESS_KEY_ID", ""),
            secret_key=self.secret_key or env.get("AWS_SECRET_ACCESS_KEY", ""),
            region=self.region or env.get("AWS_DEFAULT_REGION", "") or env.get("AWS_REGION", "") or "us-east-1",
        )

    def to_env(self) -> dict[str, str]:
        """Environment variables that make Ray workers (runtime_env) see the same S3 endpoint."""
        r = self.resolved()
        pairs = {
            "AWS_ENDPOINT_URL": r.endpoint_url,
            "AWS_ACCESS_KEY_ID": r.access_key,
            "AWS_SECRET_ACCESS_KEY": r.secret_key,
            "AWS_DEFAULT_REGION": r.region,
        }
        return {k: v for k, v in pairs.items() if v}


_DEFAULT_S3 = S3Options()


def set_default_s3(options: S3Options) -> None:
    """Set the process-wide S3 options used when a call passes none (entry scripts call this once)."""
    global _DEFAULT_S3
    _DEFAULT_S3 = options
    os.environ.update(options.to_env())


def scheme(uri: str) -> str:
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return "file"


def is_local(uri: str) -> bool:
    return scheme(uri) == "file"


def local_path(uri: str) -> str:
    """Absolute local path of a ``file://`` or plain-path URI."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/', keeping the scheme."""
    if is_local(uri) and not uri.startswith("file://"):
        return os.path.join(uri, *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def normalize(uri: str) -> str:
    """Canonical form: absolute path for local URIs, unchanged otherwise."""
    return local_path(uri) if is_local(uri) else uri.rstrip("/")


def _s3_kwargs(s3: S3Options | None) -> dict[str, Any]:
    r = (s3 or _DEFAULT_S3).resolved()
    kw: dict[str, Any] = {}
    if r.endpoint_url:
        kw["endpoint_url"] = r.endpoint_url
    if r.access_key:
        kw["key"] = r.access_key
        kw["secret"] = r.secret_key
    kw["client_kwargs"] = {"region_name": r.region}
    return kw


def fsspec_fs(uri: str, s3: S3Options | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a URI."""
    sch = scheme(uri)
    if sch == "file":
        return fsspec.filesystem("file"), local_path(uri)
    if sch in ("s3", "s3a"):
        # Caching listings across calls hides objects other processes wrote (a concurrent prepare).
        fs = fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True, **_s3_kwargs(s3))
        return fs, uri.split("://", 1)[1].rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def arrow_fs(uri: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URI; what Ray Data's read/write calls take."""
    sch = scheme(uri)
    if sch == "file":
        return pafs.LocalFileSystem(), local_path(uri)
    if sch in ("s3", "s3a"):
        r = (s3 or _DEFAULT_S3).resolved()
        kw: dict[str, Any] = {"region": r.region}
        if r.endpoint_url:
            endpoint = r.endpoint_url
            if "://" in endpoint:
                kw["scheme"], endpoint = endpoint.split("://", 1)
            kw["endpoint_override"] = endpoint
        if r.access_key:
            kw["access_key"], kw["secret_key"] = r.access_key, r.secret_key
        return pafs.S3FileSystem(**kw), uri.split("://", 1)[1].rstrip("/")
    fs, path = fsspec_fs(uri, s3)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def check_bucket(uri: str, s3: S3Options | None = None) -> None:
    """Raise StorageError if an object-store URI's bucket does not exist or cannot be reached."""
    if scheme(uri) not in ("s3", "s3a"):
        return
    fs, path = fsspec_fs(uri, s3)
    bucket = path.split("/", 1)[0]
    # HeadBucket, not fs.exists: exists() answers False when the endpoint cannot be reached at all.
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise StorageError(f"bucket {bucket!r} of {uri!r} does not exist; create it first (buckets are not "
                           "created by ltcore)") from None
    except PermissionError as e:
        raise StorageError(f"access to bucket {bucket!r} of {uri!r} was refused ({e}); check the credentials "
                           "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage.s3_* in config)") from None
    except Exception as e:
        msg = " ".join(str(e).split())
        raise StorageError(f"cannot reach object storage for {uri!r}: {type(e).__name__}: {msg}; check "
                           "AWS_ENDPOINT_URL / credentials (storage.s3_* in config)") from None


def check_writable(uri: str, s3: S3Options | None = None) -> None:
    """Raise StorageError unless files can be written under the folder ``uri``; creates nothing that stays.

    Local: the nearest existing ancestor must be a writable folder (nothing is created). Object stores: the bucket
    must exist and a probe object is put and removed.
    """
    if is_local(uri):
        path = local_path(uri)
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise StorageError(f"cannot write under {uri!r}: {probe!r} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write under {uri!r}: no write permission on {probe!r}; choose another "
                               "location or fix its permissions")
        return
    check_bucket(uri, s3)
    probe_uri = join(uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    write_bytes(probe_uri, b"", s3)
    remove(probe_uri, s3=s3)


def exists(uri: str, s3: S3Options | None = None) -> bool:
    fs, path = fsspec_fs(uri, s3)
    return bool(fs.exists(path))


@contextmanager
def open_file(uri: str, mode: str = "rb", s3: S3Options | None = None) -> Iterator[IO[Any]]:
    """Open a URI for reading; a missing file is a StorageError naming it."""
    if "w" in mode or "a" in mode:
        raise ValueError("open_file is for reading; use write_bytes/write_text (atomic) to write")
    fs, path = fsspec_fs(uri, s3)
    try:
        f = fs.open(path, mode)
    except FileNotFoundError:
        raise StorageError(f"{uri!r} does not exist") from None
    with f:
        yield f


def read_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    with open_file(uri, "rb", s3) as f:
        return bytes(f.read())


def read_text(uri: str, s3: S3Options | None = None) -> str:
    return read_bytes(uri, s3).decode("utf-8")


def read_json(uri: str, s3: S3Options | None = None) -> Any:
    return json.loads(read_text(uri, s3))


def write_bytes(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write a whole file atomically: readers see the old content or the new, never a part."""
    check_bucket(uri, s3)
    fs, path = fsspec_fs(uri, s3)
    if is_local(uri):
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create folder {folder!r} for {uri!r}: {e.strerror}") from None
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise StorageError(f"cannot write {uri!r}: {e.strerror}") from None
        return
    # Object stores: a single PUT is atomic per object.
    try:
        with fs.open(path, "wb") as f:
            f.write(data)
    except (OSError, PermissionError) as e:
        raise StorageError(f"cannot write {uri!r}: {e}") from None


def write_text(uri: str, text: str, s3: S3Options | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), s3)


def write_json(uri: str, obj: Any, s3: S3Options | None = None) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n", s3)


def listdir(uri: str, s3: S3Options | None = None) -> list[str]:
    """Full URIs of the entries directly under a folder URI (empty if it does not exist)."""
    fs, path = fsspec_fs(uri, s3)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    base = uri.rstrip("/")
    return sorted(join(base, posixpath.basename(str(n).rstrip("/"))) for n in names)


def remove(uri: str, recursive: bool = False, s3: S3Options | None = None) -> None:
    fs, path = fsspec_fs(uri, s3)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def makedirs(uri: str, s3: S3Options | None = None) -> None:
    if is_local(uri):
        os.makedirs(local_path(uri), exist_ok=True)
