from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pytest
import torch

from ltcore import storage
from ltcore.data import ingest
from ltcore.data.ingest import (
    EpochClock,
    IngestSpec,
    build_dataset,
    cut_shards,
    decode_split,
    decoded_size_bound,
    epoch_histogram,
    iter_epoch_local,
    normalize_batch,
    normalize_collate_fn,
    planned_draws,
)
from ltcore.data.transforms import normalize_images

# the fake_version fixture (conftest.py): classes common/middle/rare, train counts 12/5/2 (N = 19), val 3/2/1
TRAIN_COUNTS = [12, 5, 2]


def _local_epoch(uri, spec, epoch, batch_size=4):
    hist = np.zeros(3, np.int64)
    batches = list(iter_epoch_local(uri, spec, epoch, batch_size, histogram=hist))
    return batches, hist


def _planned_hist(uri, spec, epoch):
    _, y, r = planned_draws(uri, spec, epoch)
    return np.bincount(y, weights=r, minlength=3).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# spec, helpers


def test_spec_validation():
    with pytest.raises(ValueError, match="views"):
        IngestSpec(split="train", views=("weak", "strong", "test"))
    with pytest.raises(ValueError, match="views"):
        IngestSpec(split="train", views=("medium",))
    with pytest.raises(ValueError, match="epoch_size"):
        IngestSpec(split="train", epoch_size=0)
    with pytest.raises(ValueError, match=r"^IngestSpec.q must be None or in \[0, 1\], got 1.5$"):
        IngestSpec(split="train", q=1.5)
    spec = IngestSpec(split="val", views=("test",), shuffle=False)
    assert not spec.resamples and not spec.needs_epoch
    assert IngestSpec(split="train", q=0.0).needs_epoch
    assert IngestSpec(split="train", views=("test",), epoch_size=10).resamples
    # q = 1 draws every row once (r_i = 1): no draws to make, but the row order still changes with the epoch
    q1 = IngestSpec(split="train", views=("test",), q=1.0)
    assert not q1.resamples and q1.needs_epoch
    assert IngestSpec(split="train", views=("test",), q=1.0, progressive=True).resamples


def test_epoch_histogram():
    assert epoch_histogram(torch.tensor([0, 2, 2, 1, 2]), 4) == [1, 1, 3, 0]
    assert epoch_histogram(np.array([], np.int64), 2) == [0, 0]
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        epoch_histogram([0, 2], 2)


def test_normalize_batch():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 3, 4, 4), dtype=np.uint8)
    images.setflags(write=False)  # as Ray hands them out
    out = normalize_batch({"image": images, "image2": images, "label": np.array([1, 0])})
    assert out["image"].dtype == torch.float32
    assert torch.equal(out["image"], normalize_images(torch.from_numpy(images.copy())))
    assert torch.equal(out["image2"], out["image"])
    assert out["label"].tolist() == [1, 0] and out["label"].dtype == torch.int64


def test_unknown_split_and_missing_epoch_source(fake_version):
    with pytest.raises(ValueError, match="no split 'holdout'"):
        list(iter_epoch_local(fake_version, IngestSpec(split="holdout", views=("test",)), 0, 4))
    with pytest.raises(ValueError, match="epoch_source"):
        build_dataset(fake_version, IngestSpec(split="train", q=0.0))


# ---------------------------------------------------------------------------------------------------------------
# local iterator (no Ray)


def test_local_plain_epoch_is_each_row_once(fake_version):
    spec = IngestSpec(split="train", views=("test",), image_size=16, shuffle=False)
    batches, hist = _local_epoch(fake_version, spec, 0, batch_size=5)
    assert [b["label"].shape[0] for b in batches] == [5, 5, 5, 4]  # 19 rows
    assert hist.tolist() == TRAIN_COUNTS
    b = batches[0]
    assert b["image"].shape == (5, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["label"].dtype == torch.int64 and "image2" not in b
    again, _ = _local_epoch(fake_version, spec, 3, batch_size=5)  # test views, no sampling: epoch is irrelevant
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(batches, again))


def test_local_class_balanced_draws(fake_version):
    # q = 0: p = 1/3 each, N = 19 -> each class drawn 19/3 = 6.33 times per epoch in expectation;
    # the rare class: 2 rows x r = 3.17 -> 6 or 7 (or 8) draws
    spec = IngestSpec(split="train", views=("weak",), image_size=16, q=0.0, seed=1)
    total = np.zeros(3)
    hists = []
    for epoch in range(40):
        _, hist = _local_epoch(fake_version, spec, epoch)
        assert np.array_equal(hist, _planned_hist(fake_version, spec, epoch))
        hists.append(tuple(hist))
        total += hist
    assert len(set(hists)) > 1  # epochs differ
    np.testing.assert_allclose(total / 40, [19 / 3] * 3, rtol=0.1)


def test_local_same_seed_same_epoch(fake_version):
    spec = IngestSpec(split="train", views=("weak", "strong"), image_size=16, q=0.5, seed=2)
    a, ha = _local_epoch(fake_version, spec, 1)
    b, hb = _local_epoch(fake_version, spec, 1)
    assert np.array_equal(ha, hb)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["image2"], y["image2"])
        assert torch.equal(x["label"], y["label"])
    assert a[0]["image2"].shape == a[0]["image"].shape
    assert not torch.equal(a[0]["image"], a[0]["image2"])  # two different views
    c, _ = _local_epoch(fake_version, spec, 2)
    assert not torch.equal(torch.cat([x["image"] for x in a])[:4], torch.cat([x["image"] for x in c])[:4])
    other_seed, _ = _local_epoch(fake_version, IngestSpec(split="train", views=("weak", "strong"), image_size=16,
                                                           q=0.5, seed=3), 1)
    assert not torch.equal(a[0]["image"], other_seed[0]["image"])


def test_local_instance_sampling_identity_and_epoch_size(fake_version):
    # q = 1 resamples with r_i = 1 exactly: the same rows as no resampling, in a new order each epoch
    plain = IngestSpec(split="train", views=("test",), image_size=16, q=None, seed=0)
    q1 = IngestSpec(split="train", views=("test",), image_size=16, q=1.0, seed=0)
    _, h_plain = _local_epoch(fake_version, plain, 0)
    _, h_q1 = _local_epoch(fake_version, q1, 0)
    assert h_plain.tolist() == h_q1.tolist() == TRAIN_COUNTS
    # epoch_size 38 = 2 N with q = 1: every row exactly twice (r = 2)
    doubled = IngestSpec(split="train", views=("test",), image_size=16, q=1.0, epoch_size=38)
    _, h2 = _local_epoch(fake_version, doubled, 0)
    assert h2.tolist() == [24, 10, 4]


def test_local_progressive_moves_to_balanced(fake_version):
    spec = IngestSpec(split="train", views=("test",), image_size=16, progressive=True, total_epochs=4, seed=0)
    # epoch 0 is instance-balanced: r = 1 for every row, so the histogram is exactly the counts
    assert _local_epoch(fake_version, spec, 0)[1].tolist() == TRAIN_COUNTS
    # epoch t: expected rare-class draws (1 - t/4) * 2 + (t/4) * 19/3; at t = 3: .25 * 2 + .75 * 6.33 = 5.25
    rare = [_planned_hist(fake_version, IngestSpec(split="train", views=("test",), progressive=True,
                                                   total_epochs=4, seed=s), 3)[2] for s in range(40)]
    assert np.mean(rare) == pytest.approx(5.25, abs=0.5)


def test_local_accepts_manifest_dict_and_object(fake_version):
    from ltcore.data.manifest import Manifest

    spec = IngestSpec(split="val", views=("test",), image_size=16, shuffle=False)
    with open(fake_version) as f:
        as_dict = json.load(f)
    ref, _ = _local_epoch(fake_version, spec, 0)
    for m in (as_dict, Manifest.load(fake_version)):
        got, hist = _local_epoch(m, spec, 0)
        assert hist.tolist() == [3, 2, 1]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(ref, got))


@pytest.mark.s3
def test_local_reads_from_s3(s3_bucket, fake_version, s3_server):
    import s3fs

    from ltcore import storage

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    with open(fake_version) as f:
        m = json.load(f)
    for split, uris in m["shards"].items():
        remote = []
        for i, uri in enumerate(uris):
            dst = f"{s3_bucket}/v/{split}/part-{i:05d}.parquet"
            fs.put(uri, dst.split("://", 1)[1])
            remote.append(dst)
        m["shards"][split] = remote
    storage.write_json(f"{s3_bucket}/v/manifest.json", m)
    spec = IngestSpec(split="train", views=("weak",), image_size=16, q=0.0, seed=4)
    remote_batches, remote_hist = _local_epoch(f"{s3_bucket}/v/manifest.json", spec, 2)
    local_batches, local_hist = _local_epoch(fake_version, spec, 2)
    assert np.array_equal(remote_hist, local_hist)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(remote_batches, local_batches))


def test_ingest_module_is_importable_without_starting_ray():
    code = "import ltcore.data.ingest, sys; print('ray.data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"  # Ray Data is imported when a dataset is built, not at import


# ---------------------------------------------------------------------------------------------------------------
# Ray Data


def _row_fingerprints(batches):
    images = torch.cat([torch.as_tensor(b["image"]) for b in batches])
    labels = torch.cat([torch.as_tensor(b["label"]) for b in batches])
    keys = sorted(zip(labels.tolist(), images.sum(dim=(1, 2, 3)).tolist()))
    return [k[0] for k in keys], np.array([k[1] for k in keys])


@pytest.mark.ray
def test_cut_shards_by_decode_slots(ray_session):
    # the session's Ray has 2 CPUs: 2 slots of 1 CPU, 4 of 0.5; a split is cut below 2 shards per slot
    assert cut_shards(3, 1.0) and not cut_shards(4, 1.0)
    assert cut_shards(7, 0.5) and not cut_shards(8, 0.5)


@pytest.mark.ray
@pytest.mark.parametrize("cut", [True, False], ids=["cut", "shard-blocks"])
def test_ray_dataset_matches_local_and_redraws_per_epoch(ray_session, fake_version, cut):
    spec = IngestSpec(split="train", views=("weak",), image_size=16, q=0.0, seed=5)
    clock = EpochClock()
    ds = build_dataset(fake_version, spec, epoch_source=clock, num_cpus=0.5, decode_batch_size=4, cut=cut)
    hists = []
    for epoch in (0, 1):
        clock.set_epoch(epoch)
        batches = list(ds.iter_torch_batches(batch_size=8, local_shuffle_buffer_size=8))
        b = batches[0]
        assert b["image"].shape[1:] == (3, 16, 16) and b["image"].dtype == torch.float32
        assert b["label"].dtype == torch.int64
        hist = np.sum([epoch_histogram(x["label"], 3) for x in batches], axis=0)
        assert np.array_equal(hist, _planned_hist(fake_version, spec, epoch))
        # the very same rows and augmentations as the local iterator of that epoch
        local, _ = _local_epoch(fake_version, spec, epoch)
        ray_labels, ray_sums = _row_fingerprints(batches)
        local_labels, local_sums = _row_fingerprints(local)
        assert ray_labels == local_labels
        np.testing.assert_allclose(ray_sums, local_sums, rtol=0, atol=1e-3)
        hists.append(hist.tolist())
    assert hists[0] != hists[1]
    # uint8 rows + normalisation in the consumer: the same float32 rows
    u8 = build_dataset(fake_version, spec, epoch_source=clock, num_cpus=0.5, decode_batch_size=4, normalize=False)
    raw = next(iter(u8.iter_batches(batch_size=4)))
    assert raw["image"].dtype == np.uint8
    collated = list(u8.iter_torch_batches(batch_size=8, collate_fn=normalize_collate_fn()))  # clock still at 1
    assert _row_fingerprints(collated)[0] == ray_labels
    np.testing.assert_allclose(_row_fingerprints(collated)[1], ray_sums, rtol=0, atol=1e-3)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_cut_split_streams_when_no_whole_cpu_is_free(ray_session, fake_version):
    # A cluster whose nodes have only part of a CPU left beside the Train workers (2 workers of 0.5 CPU on two 1-CPU
    # nodes): the streaming repartition of a cut split must run on the decode tasks' CPUs. With Ray's default of one
    # whole CPU per repartition task the split never delivers a row (seen as a hung 2-node job).
    import threading

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    spec = IngestSpec(split="val", views=("test",), image_size=16, q=None, shuffle=False)
    ds = build_dataset(fake_version, spec, num_cpus=0.5, decode_batch_size=2, cut=True)
    held = placement_group([{"CPU": 1.5}])  # of the session's 2 CPUs: 0.5 left, no whole CPU
    ray.get(held.ready(), timeout=60)
    rows: list[int] = []
    reader = threading.Thread(target=lambda: rows.extend(len(b["label"]) for b in ds.iter_batches(batch_size=2)),
                              daemon=True)
    try:
        reader.start()
        reader.join(timeout=90)
        delivered = not reader.is_alive()
    finally:
        remove_placement_group(held)
        reader.join(timeout=60)
    assert delivered, "the cut split delivered nothing in 90 s with 0.5 CPU free"
    assert sum(rows) == 6  # the fake version's val split: 3 + 2 + 1


@pytest.mark.ray
def test_ray_clock_must_be_set(ray_session, fake_version):
    spec = IngestSpec(split="train", views=("weak",), image_size=16, q=0.0, seed=5)
    ds = build_dataset(fake_version, spec, epoch_source=EpochClock(), num_cpus=0.5)
    with pytest.raises(Exception, match="set_epoch"):
        ds.take_all()


@pytest.mark.ray
def test_ray_train_v2_two_workers(ray_session, fake_version, tmp_path):
    import ray.train
    import torch.distributed as tdist
    from ray.train.torch import TorchTrainer

    spec = IngestSpec(split="train", views=("weak", "strong"), image_size=16, q=0.0, seed=9)
    clock = EpochClock()

    def train_func(config):
        clock = config["clock"]
        hists = []
        for epoch in range(2):
            clock.set_epoch(epoch)
            hist = torch.zeros(3, dtype=torch.int64)
            shard = ray.train.get_dataset_shard("train")
            for batch in shard.iter_torch_batches(batch_size=4, local_shuffle_buffer_size=8):
                assert batch["image2"].shape == batch["image"].shape
                hist += torch.tensor(epoch_histogram(batch["label"], 3))
            per_rank = hist.clone()
            tdist.all_reduce(hist)  # the epoch's histogram over both workers
            hists.append({"total": hist.tolist(), "rank0": per_rank.tolist()})
            # Train V2 keeps the metrics reported with a checkpoint; rank 0 attaches one, as an engine loop does
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if ray.train.get_context().get_world_rank() == 0:
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report({"epoch": epoch, "hists": hists}, checkpoint=ckpt)

    trainer = TorchTrainer(
        train_func,
        train_loop_config={"clock": clock},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="ingest_test", storage_path=str(tmp_path)),
        datasets={"train": build_dataset(fake_version, spec, epoch_source=clock, num_cpus=0.5,
                                         decode_batch_size=4)},
    )
    result = trainer.fit()
    hists = result.metrics["hists"]
    assert len(hists) == 2
    for epoch, h in enumerate(hists):
        planned = _planned_hist(fake_version, spec, epoch)
        total = np.array(h["total"])
        # streaming_split(equal=True) gives both workers the same number of rows: at most 1 row is dropped
        assert planned.sum() - 1 <= total.sum() <= planned.sum()
        assert np.all(total <= planned) and np.abs(total - planned).sum() <= 1
        assert 0 < sum(h["rank0"]) < total.sum()  # both workers got rows
        # class-balanced: expected 19/3 = 6.3 per class; the rare class has 2 rows with r = 3.17 each
        assert total.min() >= 4
    assert hists[0]["total"] != hists[1]["total"]  # re-drawn per epoch (seed 9 plans [5, 7, 7] then [7, 7, 6])


# ---------------------------------------------------------------------------------------------------------------
# a split decoded once


def _view_fingerprints(batches):
    """Sorted (label, image sum, image2 sum) per row: the epoch as a multiset of rows and augmented views."""
    cols = {k: torch.cat([torch.as_tensor(b[k]) for b in batches]) for k in ("image", "image2", "label")}
    sums = [cols[k].double().sum(dim=(1, 2, 3)).tolist() for k in ("image", "image2")]
    return sorted(zip(cols["label"].tolist(), *sums))


def _assert_same_rows(got, want):
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose(np.array([g[1:] for g in got]), np.array([w[1:] for w in want]), rtol=0, atol=1e-2)


def test_decoded_rows_give_the_local_epoch_without_ray(fake_version):
    """The cached path's two steps (decode once; per epoch draw + augment) as plain functions: the very rows and
    augmented images of the streaming path's local iterator, in both views, for two epochs."""
    version = ingest._version(fake_version, "train")
    s3 = storage.S3Options().resolved()
    blocks = [ingest._read_decode_shards(pa.table({"uri": [u]}), s3=s3) for u in version.shards]
    first = blocks[0].to_pylist()[0]
    assert first["height"] >= 8 and len(first["pixels"]) == 3 * first["height"] * first["width"]
    spec = IngestSpec(split="train", views=("weak", "strong"), image_size=16, q=0.0, seed=3)
    hists = []
    for epoch in (0, 1):
        batches = [b for block in blocks for b in ingest._augment_decoded(
            block, spec=spec, counts=version.counts, epoch_source=epoch, normalize=True, batch_size=4)]
        local, hist = _local_epoch(fake_version, spec, epoch)
        _assert_same_rows(_view_fingerprints(batches), _view_fingerprints(local))
        hists.append(hist.tolist())
    assert hists[0] != hists[1]  # re-drawn per epoch, not a frozen first epoch


@pytest.mark.parametrize(("shards", "slots", "blocks"), [(21, 2, 22), (22, 2, 22), (2, 4, 8), (9, 4, 12), (1, 1, 2)])
def test_decoded_split_blocks_are_a_multiple_of_the_slots(shards, slots, blocks):
    assert ingest._decoded_blocks(shards, slots) == blocks


def test_decoded_size_bound_from_the_manifest(fake_version):
    version = ingest._version(fake_version, "train")
    assert decoded_size_bound(fake_version, "train") == 19 * 3 * version.image_size ** 2 * 2


@pytest.mark.ray
def test_ray_decoded_split_matches_streaming_and_keeps_slots_busy(ray_session, fake_version):
    decoded = decode_split(fake_version, "train", num_cpus=0.5)
    # 2 shards on a 2-CPU Ray with 0.5-CPU tasks: cut into 2 x 4 slots = 8 blocks, once
    assert decoded.rows == 19 and decoded.dataset.num_blocks() == 8
    assert 0 < decoded.nbytes <= decoded_size_bound(fake_version, "train")
    spec = IngestSpec(split="train", views=("weak", "strong"), image_size=16, q=0.0, seed=3)
    clock = EpochClock()
    ds = build_dataset(fake_version, spec, epoch_source=clock, num_cpus=0.5, decode_batch_size=4, normalize=False,
                       decoded=decoded)
    for epoch in (0, 1):
        clock.set_epoch(epoch)
        batches = list(ds.iter_torch_batches(batch_size=8, collate_fn=normalize_collate_fn()))
        assert batches[0]["image"].dtype == torch.float32
        local, _ = _local_epoch(fake_version, spec, epoch)
        _assert_same_rows(_view_fingerprints(batches), _view_fingerprints(local))
    with pytest.raises(ValueError, match="holds split 'train'"):
        build_dataset(fake_version, IngestSpec(split="val", views=("test",)), decoded=decoded)
