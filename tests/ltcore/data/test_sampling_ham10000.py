"""The issue's acceptance check for sampling, on HAM10000's real class counts (``dx`` column of the metadata).

Counts: nv 6705, mel 1113, bkl 1099, bcc 514, akiec 327, vasc 142, df 115 (N = 10,015, C = 7). The draws use the
real image ids as row keys, as ingest does.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from ltcore.data.sampling import class_probabilities, draw_repeats, id_keys

EPOCHS = 5


@pytest.fixture(scope="module")
def ham(ham10000_dir):
    with open(ham10000_dir / "HAM10000_metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["dx"] for r in rows})
    labels = np.array([classes.index(r["dx"]) for r in rows])
    counts = np.bincount(labels, minlength=len(classes))
    keys = id_keys([r["image_id"] for r in rows])
    return classes, labels, counts, keys


def _epoch_hist(labels, counts, keys, q, seed, epoch):
    r = draw_repeats(labels, counts, class_probabilities(counts, q), seed, epoch, row_keys=keys)
    return r, np.bincount(labels, weights=r, minlength=counts.size).astype(np.int64)


def test_ham_counts_are_the_published_ones(ham):
    classes, _, counts, _ = ham
    assert dict(zip(classes, counts.tolist())) == {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113,
                                                  "nv": 6705, "vasc": 142}


def test_class_balanced_within_10_percent_of_uniform(ham):
    _, labels, counts, keys = ham
    uniform = counts.sum() / counts.size  # 10015 / 7 = 1430.7 draws per class per epoch
    total = np.zeros(counts.size)
    for epoch in range(EPOCHS):
        _, hist = _epoch_hist(labels, counts, keys, 0.0, seed=0, epoch=epoch)
        # every epoch on its own: nv's draws are Binomial(6705, 0.213), sd 34 = 2.3% of 1430.7
        assert np.all(np.abs(hist - uniform) <= 0.10 * uniform), hist
        total += hist
    assert np.all(np.abs(total - EPOCHS * uniform) <= 0.10 * EPOCHS * uniform), total


def test_instance_sampling_reproduces_counts(ham):
    _, labels, counts, keys = ham
    for epoch in range(EPOCHS):
        r, hist = _epoch_hist(labels, counts, keys, 1.0, seed=0, epoch=epoch)
        assert np.array_equal(hist, counts)  # r_i = 1 exactly: every image once
        assert np.array_equal(r, np.ones_like(r))


def test_epochs_differ_and_seed_reproduces(ham):
    _, labels, counts, keys = ham
    first = [_epoch_hist(labels, counts, keys, 0.0, seed=0, epoch=e)[0] for e in range(EPOCHS)]
    again = [_epoch_hist(labels, counts, keys, 0.0, seed=0, epoch=e)[0] for e in range(EPOCHS)]
    other = [_epoch_hist(labels, counts, keys, 0.0, seed=1, epoch=e)[0] for e in range(EPOCHS)]
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    for e in range(EPOCHS - 1):
        # nv alone has 6705 independent Bernoulli(0.213) draws per epoch: the epochs' draws are never identical
        assert not np.array_equal(first[e], first[e + 1])
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))
