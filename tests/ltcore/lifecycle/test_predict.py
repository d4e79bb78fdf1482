"""predict.py on a folder of images in the local S3 test server: one row per image, probabilities equal to
evaluate.py's on a dataset version prepared from the same images, a corrupt image as one error row, 2 actors.
Measured: 117 s on the shared 2-core machine (load average ~25)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from ltcore import storage
from ltcore.config import load_config

from .conftest import PREDICT, REPO, last_line, run_script

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(900)]
CLASSES = ["0", "1", "2"]


def _register_model(tmp_path, cfg) -> None:
    """A small CNN with seeded random weights, registered as version 1 with the alias champion."""
    from ltcore.engine import checkpoint as ckpt
    from ltcore.lifecycle import registry, tracking
    from ltcore.models import build_model

    torch.manual_seed(0)
    model = build_model(num_classes=len(CLASSES), backbone="small_cnn", pretrained="none", head="linear")
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(200.0)  # confident, image-dependent probabilities: a 1e-5 comparison then means something
    meta = {"backbone": "small_cnn", "classes": CLASSES, "head": "linear", "feat_dim": model.feat_dim,
            "proj_dim": 0, "aux_binary": False, "cosine_scale": 16.0}
    ckpt.save_dir(str(tmp_path / "ck"), {"model": model.state_dict()}, meta)
    c = tracking.client(cfg)
    run = c.create_run(tracking.experiment_id(c, cfg))
    c.log_artifacts(run.info.run_id, str(tmp_path / "ck"), tracking.CHECKPOINT_ARTIFACT)
    mv = registry.register(c, "digits3", run.info.run_id, {"ltcore.image_size": "16", "ltcore.image_format": "JPEG"})
    registry.set_alias(c, "digits3", "champion", str(mv.version), expected=None)


def _put_images(bucket: str) -> list[str]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    rels = []
    for k in range(len(CLASSES)):
        for i in np.flatnonzero(d.target == k)[:12]:
            buf = io.BytesIO()
            Image.fromarray(pixels[i]).convert("RGB").resize((20, 24)).save(buf, format="PNG")
            rel = f"{k}/d{int(i):04d}.png"
            storage.write_bytes(f"{bucket}/new/{rel}", buf.getvalue())
            rels.append(rel)
    # A corrupt image at the top level: the image-folder dataset below skips top-level files, prediction does not.
    storage.write_bytes(f"{bucket}/new/broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    return rels


def test_predict_on_s3_equals_evaluate(ray_session, s3_bucket, tmp_path):
    from ltcore.data.prepare import prepare_dataset
    from ltcore.engine.evaluate import model_from_checkpoint, predict

    cfg = load_config(str(REPO / "ltcore" / "configs" / "retrain_demo.yaml"),
                      [f"train.storage={tmp_path / 'store'}", "tracking.model_name=digits3"])
    _register_model(tmp_path, cfg)
    rels = _put_images(s3_bucket)

    proc = run_script(PREDICT, ["--config", str(REPO / "ltcore" / "configs" / "retrain_demo.yaml"),
                                f"train.storage={tmp_path / 'store'}", "tracking.model_name=digits3",
                                "--images", f"{s3_bucket}/new", "--out", f"{s3_bucket}/pred", "--actors", "2",
                                "--batch-size", "8"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_line(proc) == f"predictions: {s3_bucket}/pred/predictions.parquet"
    assert "with digits3 version 1" in proc.stdout
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{s3_bucket}/pred/predictions.parquet"))).to_pandas()
    assert len(table) == len(rels) + 1 and set(table.id) == {*rels, "broken.jpg"}
    broken = table[table.id == "broken.jpg"].iloc[0]
    assert broken.error.startswith("cannot be decoded") and pd.isna(broken.predicted_class)
    ok = table[table.id != "broken.jpg"].set_index("id")
    assert (ok.error == "").all() and set(ok.model_version) == {"1"}
    probs = ok[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (ok.predicted_class == np.array(CLASSES)[probs.argmax(1)]).all()

    # evaluate.py's path on a dataset version prepared from the same images (image size 16, JPEG as registered)
    data = load_config(None, ["data.source.kind=imagefolder", f"data.source.image_root={s3_bucket}/new",
                              "data.name=d3", f"data.output={tmp_path / 'ds'}", "data.image_size=16"]).data
    manifest_uri, _ = prepare_dataset(data, progress=False)
    model, _ = model_from_checkpoint(str(tmp_path / "ck"))
    manifest = json.loads(storage.read_text(manifest_uri))
    compared = 0
    for split in ("train", "val", "test"):
        expected, _labels = predict(model, manifest_uri, split, 16)
        ids = [i for u in manifest["shards"][split] for i in pq.read_table(u, columns=["id"]).column("id").to_pylist()]
        got = ok.loc[ids, [f"prob_{c}" for c in CLASSES]].to_numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        compared += len(ids)
    assert compared == len(rels)
    # and they are not all the same (a random model still separates the images)
    assert probs.std(0).max() > 0.05

    # Bad input: the output exists already -> one line, exit 2, before Ray
    again = run_script(PREDICT, ["--config", str(REPO / "ltcore" / "configs" / "retrain_demo.yaml"),
                                 f"train.storage={tmp_path / 'store'}", "tracking.model_name=digits3",
                                 "--images", f"{s3_bucket}/new", "--out", f"{s3_bucket}/pred"], timeout=300)
    assert again.returncode == 2 and last_line(again).startswith("error: ") and "exists" in last_line(again)
