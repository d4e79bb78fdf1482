"""ltcore.storage: atomic writes, local / memory:// / s3:// round trips, clear errors for bad URIs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ltcore import storage


def test_local_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    uri = str(tmp_path / "sub" / "f.json")
    storage.write_json(uri, {"a": 1})
    storage.write_json(uri, {"a": 2})
    assert storage.read_json(uri) == {"a": 2}
    assert os.listdir(tmp_path / "sub") == ["f.json"]


def test_failed_write_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = str(tmp_path / "f.txt")
    storage.write_text(uri, "old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(storage.StorageError, match=r"cannot write .*f\.txt'") as e:
        storage.write_text(uri, "new")
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert storage.read_text(uri) == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # the temporary file was removed


def test_unwritable_local_uri_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(storage.StorageError) as e:
        storage.write_text(str(tmp_path / "a_file" / "sub" / "f.txt"), "data")
    assert "cannot create folder" in str(e.value) and "\n" not in str(e.value)


def test_missing_file_read_is_named(tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError, match=r"nope\.txt' does not exist"):
        storage.read_text(str(tmp_path / "nope.txt"))


def test_memory_round_trip_and_remove() -> None:
    base = f"memory://ltcore-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(storage.join(base, "d", "b.bin"), b"\x00\x01")
    storage.write_text(storage.join(base, "d", "a.txt"), "hi")
    assert storage.read_bytes(storage.join(base, "d", "b.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(base, "d", "a.txt")) == "hi"
    assert storage.exists(storage.join(base, "d", "a.txt"))
    storage.remove(storage.join(base, "d"), recursive=True)
    assert not storage.exists(storage.join(base, "d", "a.txt")) and not storage.exists(storage.join(base, "d"))


def test_join_and_normalize() -> None:
    assert storage.join("s3://b/x/", "y", "z.json") == "s3://b/x/y/z.json"
    assert storage.normalize("rel/dir") == os.path.abspath("rel/dir")
    assert storage.normalize("s3://b/x/") == "s3://b/x"


@pytest.mark.s3
def test_s3_round_trip(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/dir/m.json"
    storage.write_json(uri, {"k": [1, 2]})
    assert storage.read_json(uri) == {"k": [1, 2]}
    assert storage.exists(uri) and not storage.exists(f"{s3_bucket}/dir/other.json")
    # a Parquet file written through fsspec reads back through the pyarrow filesystem (what Ray Data uses)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": [1, 2, 3]}), sink)
    storage.write_bytes(f"{s3_bucket}/t.parquet", sink.getvalue().to_pybytes())
    fs, path = storage.arrow_fs(f"{s3_bucket}/t.parquet")
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2, 3]


@pytest.mark.s3
def test_s3_missing_bucket_is_a_clear_error(s3_server: dict[str, str]) -> None:
    uri = "s3://no-such-bucket-ltcore/x/manifest.json"
    with pytest.raises(storage.StorageError) as e:
        storage.write_text(uri, "x")
    msg = str(e.value)
    assert "bucket 'no-such-bucket-ltcore'" in msg and "does not exist" in msg and "\n" not in msg
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_bucket(uri)


def test_s3_unreachable_endpoint_is_not_a_missing_bucket() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    opts = storage.S3Options(endpoint_url=f"http://127.0.0.1:{port}", access_key="k", secret_key="s")
    with pytest.raises(storage.StorageError) as e:
        storage.write_text("s3://some-bucket/x/manifest.json", "x", opts)
    msg = str(e.value)
    assert msg.startswith("cannot reach object storage for 's3://some-bucket/x/manifest.json'")
    assert f"127.0.0.1:{port}" in msg and "AWS_ENDPOINT_URL" in msg and "\n" not in msg
