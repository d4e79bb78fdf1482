from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ltcore.methods.pk import PKBatcher

P, K = 2, 3


def _stream(labels: list[int], batch_size: int = 7) -> Iterator[dict[str, torch.Tensor]]:
    """Row batches with a row id and a feature that encodes (id, label), so rows can be traced."""
    y = torch.tensor(labels)
    ids = torch.arange(len(labels))
    feats = torch.stack([ids.float(), y.float()], dim=1)  # (N, 2)
    for s in range(0, len(labels), batch_size):
        yield {"label": y[s : s + batch_size], "id": ids[s : s + batch_size], "x": feats[s : s + batch_size]}


def _balanced_labels(n: int = 60, classes: int = 4, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g).tolist()


def _run(labels: list[int], epoch: int = 0, seed: int = 0, **kw: int) -> tuple[PKBatcher, list[dict]]:
    pk = PKBatcher(P, K, seed=seed, **kw)
    pk.set_epoch(epoch)
    return pk, list(pk(_stream(labels)))


def test_every_batch_is_p_classes_by_k_rows() -> None:
    labels = _balanced_labels()
    pk, out = _run(labels)
    assert len(out) >= 8
    for b in out:
        assert set(b) == {"label", "id", "x"}
        assert b["label"].shape == (P * K,)
        blocks = b["label"].view(P, K)
        # K consecutive rows per class, P distinct classes
        assert bool((blocks == blocks[:, :1]).all())
        assert len(set(blocks[:, 0].tolist())) == P
        # rows stay whole: the feature row is (id, label) of the same input row
        torch.testing.assert_close(b["x"], torch.stack([b["id"].float(), b["label"].float()], dim=1))
    # rows out = rows in - dropped + repeated
    assert sum(b["label"].numel() for b in out) == len(labels) - pk.dropped + pk.repeated


def test_rows_are_not_reused_except_top_ups() -> None:
    pk, out = _run(_balanced_labels())
    ids = torch.cat([b["id"] for b in out])
    assert ids.numel() - ids.unique().numel() == pk.repeated


def test_reproducible_and_epoch_dependent() -> None:
    labels = _balanced_labels()
    _, a = _run(labels, epoch=0)
    _, b = _run(labels, epoch=0)
    _, c = _run(labels, epoch=1)
    assert [x["id"].tolist() for x in a] == [x["id"].tolist() for x in b]
    assert [x["id"].tolist() for x in a] != [x["id"].tolist() for x in c]
    _, d = _run(labels, epoch=0, seed=1)
    assert [x["id"].tolist() for x in a] != [x["id"].tolist() for x in d]


def test_flush_tops_up_small_classes_by_repetition() -> None:
    # class 0: 3 rows, class 1: 1 row -> one ready class during the stream; the flush emits one batch where
    # class 1's single row is repeated K times (K - 1 = 2 extra copies)
    pk, out = _run([0, 0, 0, 1])
    assert len(out) == 1
    b = out[0]
    assert sorted(b["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert b["id"][b["label"] == 1].tolist() == [3, 3, 3]
    assert pk.repeated == 2 and pk.dropped == 0


def test_leftovers_of_fewer_than_p_classes_are_dropped() -> None:
    pk, out = _run([0, 0, 0, 0])  # one class only: no P = 2 batch can be made
    assert out == [] and pk.dropped == 4


def test_buffer_cap_drops_oldest_rows() -> None:
    # an instance stream dominated by class 0; class 1 arrives at the end
    labels = [0] * 20 + [1] * 3
    pk, out = _run(labels, max_per_class=4)
    # batches of 7: class 0 overflows the cap by 3, 7 and 6 rows (16), keeping ids 16-19; the one batch takes 3 of
    # them and 3 rows of class 1; the last class-0 row is left alone at the end (fewer than P classes): 17 dropped
    assert pk.dropped == 17
    assert len(out) == 1
    assert out[0]["id"][out[0]["label"] == 0].min() >= 16


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        PKBatcher(0, 2)
    with pytest.raises(ValueError, match="max_per_class"):
        PKBatcher(2, 4, max_per_class=3)
    pk = PKBatcher(P, K)
    with pytest.raises(ValueError, match="no 'label' column"):
        list(pk([{"x": torch.zeros(2)}]))
    with pytest.raises(ValueError, match="expected 2 rows"):
        list(pk([{"label": torch.tensor([0, 1]), "x": torch.zeros(3)}]))
    with pytest.raises(ValueError, match="1-D integer"):
        list(pk([{"label": torch.tensor([0.0, 1.0])}]))
