"""Evaluate any saved ltcore checkpoint on any dataset version split, in one process (no cluster needed)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ltcore import storage
from ltcore.data.ingest import IngestSpec, iter_epoch_local
from ltcore.data.manifest import Manifest
from ltcore.engine import checkpoint as ckpt
from ltcore.eval.metrics import compute_metrics
from ltcore.eval.plots import plot_confusion, plot_recall_vs_count
from ltcore.eval.report import metrics_table, write_report
from ltcore.models import LTModel, build_model


def model_from_checkpoint(uri: str) -> tuple[LTModel, dict[str, Any]]:
    state, meta = ckpt.load_uri(uri)
    model = build_model(num_classes=len(meta["classes"]), backbone=meta["backbone"], pretrained="none",
                        head=meta["head"], proj_dim=int(meta.get("proj_dim") or 0),
                        aux_binary=bool(meta.get("aux_binary")), cosine_scale=float(meta.get("cosine_scale", 16.0)))
    model.load_state_dict(state["model"])
    return model.eval(), meta


@torch.no_grad()
def predict(model: LTModel, manifest_uri: str, split: str, image_size: int, batch_size: int = 128
            ) -> tuple[np.ndarray, np.ndarray]:
    spec = IngestSpec(split=split, views=("test",), image_size=image_size, q=None, seed=0, shuffle=False)
    probs, labels = [], []
    for batch in iter_epoch_local(manifest_uri, spec, epoch=0, batch_size=batch_size):
        probs.append(torch.softmax(model(batch["image"])["logits"].float(), 1).numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(probs), np.concatenate(labels)


def evaluate_checkpoint(model_uri: str, manifest_uri: str, split: str = "test", *, out_uri: str | None = None,
                        batch_size: int = 128, log: Any = print) -> str:
    manifest = Manifest.load(manifest_uri)
    model, meta = model_from_checkpoint(model_uri)
    if list(meta["classes"]) != list(manifest.classes):
        raise ckpt.CheckpointError(
            f"model classes {meta['classes']} differ from the dataset's {list(manifest.classes)}; "
            "evaluate on a dataset version with the same class list")
    probs, labels = predict(model, manifest_uri, split, manifest.image_size, batch_size)
    counts = manifest.class_counts("train")
    metrics = compute_metrics(labels, probs, list(manifest.classes), counts)
    out = out_uri or storage.join(model_uri, f"eval-{split}")
    plot_confusion(metrics["confusion_matrix"], list(manifest.classes), storage.join(out, "confusion_matrix.png"))
    plot_recall_vs_count(metrics["per_class_recall"], dict(zip(manifest.classes, counts)),
                         storage.join(out, "recall_vs_count.png"))
    log(metrics_table({f"{meta.get('method', 'model')} {split}": metrics}))
    return write_report(out, {"model": model_uri, "dataset": manifest_uri, "split": split,
                              "class_counts": {"train": counts}, "metrics": {split: metrics}})
