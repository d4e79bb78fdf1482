"""Fixtures for the data tests: a tiny dataset version written with pyarrow (Parquet shards + manifest.json).

The layout follows the contract of :mod:`ltcore.data.manifest` (columns ``id`` string, ``image`` binary PNG,
``label`` int32, ``group`` string; manifest fields ``classes``, ``counts``, ``image_size``, ``shards``,
``group_column``, ``hash``), without going through prepare, so the ingest tests do not depend on it; and HAM10000
prepared once per session (``ham10000_version``) for the tests that need the real dataset.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ltcore.config import DataConfig, SourceConfig
from ltcore.data.prepare import prepare_dataset

FAKE_CLASSES = ("common", "middle", "rare")
FAKE_COUNTS = {"train": (12, 5, 2), "val": (3, 2, 1)}


def png_bytes(rng: np.random.Generator, height: int = 12, width: int = 16) -> bytes:
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_version(
    root: str | Path,
    counts: dict[str, Sequence[int]],
    classes: Sequence[str] = FAKE_CLASSES,
    *,
    shards_per_split: int = 2,
    image_size: int = 16,
    seed: int = 0,
) -> str:
    """Write a dataset version under ``root`` and return its manifest URI (a local path)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    shards: dict[str, list[str]] = {}
    for split, per_class in counts.items():
        labels = np.concatenate([np.full(n, j, np.int32) for j, n in enumerate(per_class)])
        ids = [f"{split}-{i:04d}" for i in range(labels.size)]
        images = [png_bytes(rng) for _ in ids]
        order = rng.permutation(labels.size)  # classes interleaved across shards, as prepare writes them
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        shards[split] = []
        for k, part in enumerate(np.array_split(order, shards_per_split)):
            table = pa.table({
                "id": pa.array([ids[i] for i in part], pa.string()),
                "image": pa.array([images[i] for i in part], pa.binary()),
                "label": pa.array(labels[part], pa.int32()),
                "group": pa.array([ids[i] for i in part], pa.string()),
            })
            path = folder / f"part-{k:05d}.parquet"
            pq.write_table(table, path)
            shards[split].append(str(path))
    manifest = {
        "name": "fake",
        "hash": "0" * 16,
        "classes": list(classes),
        "counts": {s: {c: int(n) for c, n in zip(classes, per)} for s, per in counts.items()},
        "image_size": image_size,
        "shards": shards,
        "group_column": "",
        "format_version": 1,
    }
    uri = root / "manifest.json"
    uri.write_text(json.dumps(manifest, indent=2))
    return str(uri)


@pytest.fixture(scope="session")
def fake_version(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Manifest URI of a 3-class version: train counts 12/5/2 in 2 shards, val 3/2/1."""
    return write_version(tmp_path_factory.mktemp("fake_version"), FAKE_COUNTS)


@pytest.fixture()
def version_writer(tmp_path: Path) -> Callable[..., str]:
    """``version_writer(counts, **kw)`` -> manifest URI of a fresh version under the test's tmp_path."""

    def make(counts: dict[str, Sequence[int]], **kw: object) -> str:
        return write_version(tmp_path / f"v{len(list(tmp_path.iterdir()))}", counts, **kw)  # type: ignore[arg-type]

    return make


def ham_config(ham: Path, output: str) -> DataConfig:
    """What ltcore/configs/ham10000.yaml says, with the data folder and output given."""
    src = SourceConfig(kind="table", table=str(ham / "HAM10000_metadata.csv"), image_root=str(ham / "images"),
                       id_column="image_id", path_template="{id}.jpg", label_column="dx", group_column="lesion_id")
    return DataConfig(name="ham10000", source=src, output=output, image_size=128)


@dataclass(frozen=True)
class HamVersion:
    """HAM10000 prepared once per session at 128 px: its manifest URI, the config, the first run's outcome."""

    uri: str
    config: DataConfig
    first_up_to_date: bool
    first_wall_s: float


@pytest.fixture(scope="session")
def ham10000_version(ray_session: None, ham10000_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> HamVersion:
    """The lesion-grouped HAM10000 version of ``ltcore/configs/ham10000.yaml`` (a full prepare, ~1 minute)."""
    cfg = ham_config(ham10000_dir, str(tmp_path_factory.mktemp("ham10000") / "datasets"))
    t0 = time.monotonic()
    uri, up_to_date = prepare_dataset(cfg, progress=False)
    return HamVersion(uri, cfg, up_to_date, time.monotonic() - t0)
