from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ltcore.data import sampling
from ltcore.data.sampling import (
    class_probabilities,
    draw_repeats,
    epoch_rng,
    id_keys,
    pk_batches,
    progressive_probabilities,
    repeat_factors,
    row_uniforms,
    stochastic_round,
)


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        ([4, 1], 0.0, [0.5, 0.5]),  # class-balanced: 4^0 = 1^0 = 1
        ([4, 1], 1.0, [0.8, 0.2]),  # instance: 4/5, 1/5
        ([4, 1], 0.5, [2 / 3, 1 / 3]),  # square-root: sqrt 4 = 2, sqrt 1 = 1 -> 2/3, 1/3
        ([9, 3, 0], 0.0, [0.5, 0.5, 0.0]),  # an empty class cannot be drawn, even though 0^0 = 1
        ([6, 2, 2], 1.0, [0.6, 0.2, 0.2]),
    ],
)
def test_class_probabilities(counts, q, expected):
    np.testing.assert_allclose(class_probabilities(counts, q), expected, rtol=0, atol=1e-12)


def test_class_probabilities_rejects_bad_counts():
    with pytest.raises(ValueError, match="non-negative integers"):
        class_probabilities([3, -1], 0.0)
    with pytest.raises(ValueError, match="all zero"):
        class_probabilities([0, 0], 1.0)
    with pytest.raises(ValueError, match="finite"):
        class_probabilities([1, 2], float("nan"))


def test_progressive_probabilities():
    # counts [3, 1]: p^IB = [.75, .25], p^CB = [.5, .5]; epoch 2 of 4: 0.5 * IB + 0.5 * CB = [.625, .375]
    np.testing.assert_allclose(progressive_probabilities([3, 1], 2, 4), [0.625, 0.375], atol=1e-12)
    np.testing.assert_allclose(progressive_probabilities([3, 1], 0, 4), [0.75, 0.25], atol=1e-12)
    np.testing.assert_allclose(progressive_probabilities([3, 1], 4, 4), [0.5, 0.5], atol=1e-12)
    # epoch 1 of 4: 0.75 * [.75, .25] + 0.25 * [.5, .5] = [.6875, .3125]
    np.testing.assert_allclose(progressive_probabilities([3, 1], 1, 4), [0.6875, 0.3125], atol=1e-12)
    with pytest.raises(ValueError, match="epoch"):
        progressive_probabilities([3, 1], 5, 4)


def test_repeat_factors_class_balanced_toy():
    # counts [4, 1], q = 0: p = [.5, .5], N = 5; r = p_y * N / n_y = .5*5/4 = 0.625 for class 0, .5*5/1 = 2.5
    labels = [0, 0, 0, 0, 1]
    r = repeat_factors(labels, [4, 1], class_probabilities([4, 1], 0.0))
    np.testing.assert_allclose(r, [0.625] * 4 + [2.5], atol=1e-12)
    assert r.sum() == pytest.approx(5.0)  # expected epoch size stays N


def test_repeat_factors_instance_is_exactly_one():
    # identity: q = 1 gives r_i = (n/N) * N / n = 1 for every sample, exactly (no 0.999... left to round down)
    counts = [7, 3, 1]
    labels = np.repeat([0, 1, 2], counts)
    r = repeat_factors(labels, counts, class_probabilities(counts, 1.0))
    assert np.array_equal(r, np.ones(11))
    assert np.array_equal(draw_repeats(labels, counts, class_probabilities(counts, 1.0), 0, 3), np.ones(11, int))


def test_repeat_factors_epoch_size():
    # counts [2, 2], q = 1, M = 8: r = .5 * 8 / 2 = 2 for every sample
    r = repeat_factors([0, 0, 1, 1], [2, 2], [0.5, 0.5], epoch_size=8)
    assert np.array_equal(r, [2.0, 2.0, 2.0, 2.0])


def test_repeat_factors_rejects_bad_input():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        repeat_factors([0, 2], [1, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match="one probability per class"):
        repeat_factors([0, 1], [1, 1], [1.0])
    with pytest.raises(ValueError, match="sum to 1"):
        repeat_factors([0, 1], [1, 1], [0.5, 0.6])
    with pytest.raises(ValueError, match="class count of 0"):
        repeat_factors([0, 1], [2, 0], [1.0, 0.0])


def test_stochastic_round_with_given_uniforms():
    # floor + (u < frac): 0.25 with u .2 -> 1; 1.5 with u .6 -> 1; 2.0 -> 2 whatever u; 0.0 -> 0
    out = stochastic_round(np.array([0.25, 1.5, 2.0, 0.0]), uniforms=np.array([0.2, 0.6, 0.99, 0.0]))
    assert out.tolist() == [1, 1, 2, 0]
    assert out.dtype == np.int64


def test_stochastic_round_is_unbiased():
    rng = np.random.default_rng(0)
    out = stochastic_round(np.full(200_000, 0.3), rng)
    # mean of Bernoulli(0.3) over 2e5 draws: sd = sqrt(.21 / 2e5) = 0.001
    assert out.mean() == pytest.approx(0.3, abs=0.005)
    assert set(np.unique(out)) == {0, 1}


def test_stochastic_round_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        stochastic_round(np.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        stochastic_round(np.array([-0.5]), np.random.default_rng(0))


def test_epoch_rng_keys_streams():
    a = epoch_rng(0, 1).random(4)
    assert np.array_equal(a, epoch_rng(0, 1).random(4))
    assert not np.array_equal(a, epoch_rng(0, 2).random(4))
    assert not np.array_equal(a, epoch_rng(1, 1).random(4))
    assert not np.array_equal(a, epoch_rng(0, 1, key=5).random(4))
    with pytest.raises(ValueError, match="seed"):
        epoch_rng(-1, 0)


def test_draw_repeats_seed_epoch():
    counts = [4, 1]
    labels = [0, 0, 0, 0, 1]
    probs = class_probabilities(counts, 0.0)
    a = draw_repeats(labels, counts, probs, seed=3, epoch=0)
    assert np.array_equal(a, draw_repeats(labels, counts, probs, seed=3, epoch=0))
    # class 0 rows: 0 or 1 copies (r = .625); the class-1 row: 2 or 3 copies (r = 2.5)
    assert set(a[:4]) <= {0, 1} and a[4] in (2, 3)
    epochs = [tuple(draw_repeats(labels, counts, probs, seed=3, epoch=e)) for e in range(8)]
    assert len(set(epochs)) > 1


def test_draw_repeats_row_keys_make_draws_order_free():
    counts = [5, 2, 1]
    labels = np.array([0, 1, 0, 2, 0, 1, 0, 0])
    keys = id_keys([f"img{i}" for i in range(8)])
    probs = class_probabilities(counts, 0.0)
    a = draw_repeats(labels, counts, probs, 0, 4, row_keys=keys)
    perm = np.array([7, 3, 0, 5, 1, 6, 2, 4])
    b = draw_repeats(labels[perm], counts, probs, 0, 4, row_keys=keys[perm])
    assert np.array_equal(a[perm], b)  # each row's draw goes with the row, not its position
    # a subset (one Ray block) draws the same as those rows within the whole split
    assert np.array_equal(draw_repeats(labels[:3], counts, probs, 0, 4, row_keys=keys[:3]), a[:3])


def test_id_keys_and_row_uniforms():
    k = id_keys(["a", "b", "a"])
    assert k.dtype == np.uint64 and k[0] == k[2] and k[0] != k[1]
    u = row_uniforms(id_keys([f"x{i}" for i in range(20_000)]), seed=0, epoch=0)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert u.mean() == pytest.approx(0.5, abs=0.01)  # sd of the mean: 0.29 / sqrt(2e4) = 0.002
    assert not np.array_equal(u[:5], row_uniforms(id_keys([f"x{i}" for i in range(5)]), seed=0, epoch=1))


def test_class_balanced_draws_converge():
    # counts [40, 8, 2], q = 0: each class drawn N/C = 50/3 times per epoch in expectation; over 300 epochs the
    # mean is within a few percent (the rarest class: 2 rows x r = 8.33, sd of the epoch total ~0.7)
    counts = [40, 8, 2]
    labels = np.repeat([0, 1, 2], counts)
    probs = class_probabilities(counts, 0.0)
    hist = np.zeros(3)
    for e in range(300):
        r = draw_repeats(labels, counts, probs, seed=1, epoch=e)
        hist += np.bincount(labels, weights=r, minlength=3)
    np.testing.assert_allclose(hist / 300, [50 / 3] * 3, rtol=0.03)


def test_pk_batches_toy():
    labels = np.array([0, 0, 0, 1, 1, 2])  # class 2 has 1 sample < K = 2: drawn with replacement
    batches = pk_batches(labels, num_classes_per_batch=2, samples_per_class=2, seed=0, epoch=0, num_batches=20)
    assert len(batches) == 20
    seen_classes = set()
    for b in batches:
        assert b.shape == (4,)
        cls = labels[b]
        # K consecutive indices per class, P distinct classes
        assert cls[0] == cls[1] and cls[2] == cls[3] and cls[0] != cls[2]
        for j in (0, 2):
            if cls[j] != 2:  # classes with >= K samples: no repeated index
                assert b[j] != b[j + 1]
        seen_classes |= set(cls.tolist())
    assert seen_classes == {0, 1, 2}
    again = pk_batches(labels, 2, 2, 0, 0, 20)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))
    other = pk_batches(labels, 2, 2, 0, 1, 20)
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other))


def test_pk_batches_rejects_too_many_classes():
    with pytest.raises(ValueError, match="only 2 classes"):
        pk_batches([0, 1, 1], 3, 2, 0, 0, 1)


def test_sampling_imports_without_ray_or_torch():
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['torch'] = None\n"
        "import ltcore.data.sampling as s; print(s.class_probabilities([1, 3], 0.0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[0.5 0.5]" in out.stdout
    assert sampling.__name__ == "ltcore.data.sampling"


# ---------------------------------------------------------------------------------------------------------------
# the stage-1 sampling policy: config -> which stream draws which classes at which epoch

# counts [3, 1], 4 epochs. Instance-balanced (IB) p = [3/4, 1/4]; class-balanced (CB) p = [1/2, 1/2];
# square root: [sqrt 3, 1] / (sqrt 3 + 1) = [.6340, .3660]. Progressive at epoch t of T = 4:
# (1 - t/4) IB + (t/4) CB: t = 0 -> IB; t = 2 -> [.625, .375]; t = 3 -> [.25*.75 + .75*.5, .25*.25 + .75*.5]
# = [.5625, .4375].
IB, CB, SQRT = [0.75, 0.25], [0.5, 0.5], [3**0.5 / (3**0.5 + 1), 1 / (3**0.5 + 1)]
PROG = [[0.75, 0.25], [0.625, 0.375], [0.5625, 0.4375]]  # epochs 0, 2, 3
EPOCHS = (0, 2, 3)


@pytest.mark.parametrize(
    ("q", "progressive", "pk_classes", "tail_stream", "expected"),
    [
        # stage1.q alone: the train stream draws p_j ~ n_j^q in every epoch
        (1.0, False, 0, False, {"train": [IB] * 3}),
        (0.0, False, 0, False, {"train": [CB] * 3}),
        (0.5, False, 0, False, {"train": [SQRT] * 3}),
        # progressive: instance -> class-balanced over the epochs; q is ignored
        (1.0, True, 0, False, {"train": PROG}),
        (0.0, True, 0, False, {"train": PROG}),
        # P x K batches: a q = 1 stream becomes class-balanced; an explicit q < 1 or a schedule is kept
        (1.0, False, 4, False, {"train": [CB] * 3}),
        (0.5, False, 4, False, {"train": [SQRT] * 3}),
        (1.0, True, 4, False, {"train": PROG}),
        # SPMix: a class-balanced tail stream beside the train stream, whatever the train stream does
        (1.0, False, 0, True, {"train": [IB] * 3, "tail": [CB] * 3}),
        (1.0, True, 0, True, {"train": PROG, "tail": [CB] * 3}),
        (1.0, False, 4, True, {"train": [CB] * 3, "tail": [CB] * 3}),
    ],
)
def test_stage1_sampling_table(q, progressive, pk_classes, tail_stream, expected):
    policy = sampling.stage1_sampling(q=q, progressive=progressive, pk_classes=pk_classes, tail_stream=tail_stream)
    got = {name: [p.probabilities([3, 1], e, 4).tolist() for e in EPOCHS] for name, p in policy.items()}
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-12, err_msg=name)
    # the tail stream draws independently of the train stream (seed + 1)
    assert [p.seed_offset for p in policy.values()] == [0, 1][: len(policy)]


def test_stage1_sampling_identity_and_bad_values():
    # q = 1 without a schedule draws every row once: the ingest skips the draws
    assert sampling.stage1_sampling(q=1.0, progressive=False, pk_classes=0, tail_stream=False)["train"].is_identity
    assert not sampling.StreamSampling(q=1.0, progressive=True).is_identity
    for q in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
            sampling.stage1_sampling(q=q, progressive=False, pk_classes=0, tail_stream=False)
    with pytest.raises(ValueError, match="pk_classes must be >= 0"):
        sampling.stage1_sampling(q=1.0, progressive=False, pk_classes=-1, tail_stream=False)
