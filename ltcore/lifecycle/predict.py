"""Batch prediction with a registered model on Ray Data: images (a folder or a label table, any URI) -> Parquet.

One row per image: ``id``, ``uri``, ``predicted_class``, ``prob_<class>`` for every class, ``model``,
``model_version``, ``error`` (empty, or why the image could not be read or decoded: such rows have no prediction
and NaN probabilities; they never stop the job).

Each image goes through what a dataset version's images went through, then the ``test`` transform:
prepare's resize of the shorter side to the model's image size and re-encoding (``ltcore.data.prepare.resize_encode``,
the format recorded on the model version), decode, resize + centre crop, normalise. So the probabilities equal
evaluate.py's on a dataset version prepared from the same images.

Ray Data: a dataset of ``(id, uri)`` rows, ``map_batches`` with a callable class on an ``ActorPoolStrategy`` (the
model is built once per actor; one GPU per actor where the cluster has GPUs). The actors read the images
themselves, so an unreadable file is an error row rather than a failed read task.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ltcore import storage

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
OUTPUT_NAME = "predictions.parquet"


@dataclass(frozen=True)
class ModelSpec:
    """What an actor needs to build the model and feed it: weights, classes, image size and format."""

    name: str
    version: str
    classes: tuple[str, ...]
    image_size: int
    image_format: str


def list_images(images: str, *, id_column: str = "image_id", path_template: str = "{id}",
                s3: storage.S3Options | None = None) -> list[dict[str, str]]:
    """``[{"id", "uri"}]`` of the images to predict: every image file under a folder (id = its path under the
    folder), or the rows of a CSV/Parquet table (id = ``id_column``; file = ``path_template`` under the table's
    folder). A table row whose file is missing stays: it becomes an error row.

    Raises:
        ValueError: nothing to predict, or the table lacks ``id_column``.
    """
    from ltcore.data.sources import IMAGE_EXTENSIONS, _read_table

    if images.lower().endswith(TABLE_SUFFIXES):
        df = _read_table(images, s3)
        if id_column not in df.columns:
            raise ValueError(f"image table {images!r} has no column {id_column!r} (--id-column); its columns: "
                             f"{', '.join(map(str, df.columns[:20]))}")
        root = posixpath.dirname(images.rstrip("/"))
        rows = [{"id": str(v), "uri": storage.join(root, path_template.format(id=v))} for v in df[id_column].tolist()]
    else:
        fs, base = storage.fsspec_fs(images, s3)
        base = base.rstrip("/")
        try:
            found = sorted(p for p, info in fs.find(base, detail=True).items() if info.get("type", "file") == "file")
        except FileNotFoundError:
            found = []
        except Exception as e:
            raise storage.StorageError(f"cannot list {images!r}: {type(e).__name__}: {e}") from None
        rows = []
        for p in found:
            rel = posixpath.relpath(p, base)
            if rel.lower().endswith(IMAGE_EXTENSIONS) and not any(s.startswith(".") for s in rel.split("/")):
                rows.append({"id": rel, "uri": storage.join(images.rstrip("/"), rel)})
    if not rows:
        raise ValueError(f"no images to predict in {images!r} (image files: {', '.join(IMAGE_EXTENSIONS)})")
    return rows


def preprocess(data: bytes, image_size: int, image_format: str) -> Any:
    """Encoded image bytes -> uint8 ``(3, S, S)`` tensor, exactly as a prepared dataset version's image reaches the
    model (prepare's resize + re-encode, then decode and the ``test`` transform without normalisation)."""
    from ltcore.data.prepare import resize_encode
    from ltcore.data.transforms import build_transform, decode_image

    return build_transform("test", image_size, normalize=False)(decode_image(resize_encode(data, image_size,
                                                                                           image_format)))


class Predictor:
    """Ray Data callable class: builds the model once (per actor), then predicts batches of ``(id, uri)`` rows."""

    def __init__(self, spec: ModelSpec, state: Mapping[str, Any], meta: Mapping[str, Any],
                 s3: storage.S3Options | None = None) -> None:
        import torch

        from ltcore.models import build_model

        self.spec, self.s3 = spec, s3
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(num_classes=len(spec.classes), backbone=meta["backbone"], pretrained="none",
                            head=meta["head"], proj_dim=int(meta.get("proj_dim") or 0),
                            aux_binary=bool(meta.get("aux_binary")), cosine_scale=float(meta.get("cosine_scale", 16.0)))
        model.load_state_dict(state["model"])
        self.model = model.eval().to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ltcore.data.transforms import normalize_images

        ids, uris = [str(x) for x in batch["id"]], [str(x) for x in batch["uri"]]
        c = len(self.spec.classes)
        errors = [""] * len(ids)
        images, ok = [], []
        for i, uri in enumerate(uris):
            try:
                data = storage.read_bytes(uri, self.s3)
            except Exception as e:
                errors[i] = f"cannot be read ({type(e).__name__}: {_first_line(e)})"
                continue
            try:
                images.append(preprocess(data, self.spec.image_size, self.spec.image_format))
                ok.append(i)
            except Exception as e:  # Pillow raises many types for bad files
                errors[i] = f"cannot be decoded ({type(e).__name__}: {_first_line(e)})"
        probs = np.full((len(ids), c), np.nan, dtype=np.float32)  # (B, C)
        if images:
            x = normalize_images(torch.stack(images).to(self.device))  # (b, 3, S, S)
            with torch.no_grad():
                p = torch.softmax(self.model(x)["logits"].float(), dim=1).cpu().numpy()  # (b, C)
            probs[ok] = p
        pred = np.array([self.spec.classes[int(k)] if not e else None
                         for k, e in zip(np.nan_to_num(probs, nan=-1.0).argmax(1), errors)], dtype=object)
        out: dict[str, np.ndarray] = {"id": np.array(ids, dtype=object), "uri": np.array(uris, dtype=object),
                                      "predicted_class": pred}
        for k, name in enumerate(self.spec.classes):
            out[f"prob_{name}"] = probs[:, k]
        out["model"] = np.array([self.spec.name] * len(ids), dtype=object)
        out["model_version"] = np.array([self.spec.version] * len(ids), dtype=object)
        out["error"] = np.array(errors, dtype=object)
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no detail"


def check_output(out: str, s3: storage.S3Options | None = None) -> str:
    """The output file URI under ``out``; ``out`` must not hold predictions already (nothing is overwritten)."""
    storage.check_bucket(out, s3)
    target = storage.join(out, OUTPUT_NAME)
    if storage.exists(target, s3):
        raise ValueError(f"{target!r} exists; choose another --out (predictions are never overwritten)")
    storage.check_writable(out, s3)
    return target


def run_prediction(rows: list[dict[str, str]], spec: ModelSpec, state: Mapping[str, Any], meta: Mapping[str, Any],
                   out_uri: str, *, actors: int = 2, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                   batch_size: int = 64, s3: storage.S3Options | None = None, log: Any = print,
                   progress_every_s: float = 10.0) -> dict[str, int]:
    """Predict ``rows`` with an actor pool and write ``out_uri`` (one Parquet file, written once at the end).

    Returns ``{"rows": n, "errors": n_errors}``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    s3 = (s3 or storage.S3Options()).resolved()
    blocks = max(1, min(len(rows) // max(1, batch_size) + 1, 4 * actors))
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        Predictor, fn_constructor_kwargs={"spec": spec, "state": state, "meta": meta, "s3": s3},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None)
    t0 = last = time.perf_counter()
    n = n_err = 0
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, OUTPUT_NAME)
        writer: pq.ParquetWriter | None = None
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                table: pa.Table = batch  # type: ignore[assignment]
                if writer is None:
                    writer = pq.ParquetWriter(local, table.schema)
                writer.write_table(table.cast(writer.schema))
                n += table.num_rows
                n_err += len([e for e in table.column("error").to_pylist() if e])
                now = time.perf_counter()
                if now - last >= progress_every_s:
                    last = now
                    log(f"predict: {n}/{len(rows)} images ({n / (now - t0):.1f} img/s), {n_err} errors")
        finally:
            if writer is not None:
                writer.close()
        with open(local, "rb") as f:
            storage.write_bytes(out_uri, f.read(), s3)
    dt = time.perf_counter() - t0
    log(f"predict: {n} images in {dt:.1f} s ({n / max(dt, 1e-9):.1f} img/s), {n_err} errors")
    return {"rows": n, "errors": n_err}


def load_version(cfg: Any, ref: str) -> tuple[ModelSpec, dict[str, Any], dict[str, Any]]:
    """A registered model version (number or alias) of the config's model: its spec, state and meta, read on the
    driver (``weights_only``) so that actors get them from Ray's object store.

    Raises:
        ValueError: no such version or alias; a version without ltcore's image tags.
    """
    from ltcore.engine import checkpoint as ckpt
    from ltcore.lifecycle import registry, tracking
    from ltcore.lifecycle.retrain import model_name

    c = tracking.client(cfg, default_embedded=True)
    name = model_name(cfg)
    mv = registry.resolve(c, name, ref)
    tags = mv.tags
    if "ltcore.image_size" not in tags:
        raise ValueError(f"model {name!r} version {mv.version} has no ltcore.image_size tag: it was not registered "
                         "by retrain.py")
    with tempfile.TemporaryDirectory() as tmp:
        state, meta = ckpt.load_dir(registry.download_checkpoint(mv, tmp))
    spec = ModelSpec(name=name, version=str(mv.version), classes=tuple(meta["classes"]),
                     image_size=int(tags["ltcore.image_size"]), image_format=tags.get("ltcore.image_format", "JPEG"))
    return spec, state, meta
