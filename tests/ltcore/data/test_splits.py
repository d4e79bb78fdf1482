"""Long-tail subsampling, stratified limit and the group-aware stratified split on small toy sets."""

from __future__ import annotations

import numpy as np
import pytest

from ltcore.data.splits import group_stratified_split, long_tail_counts, long_tail_subsample, stratified_limit

FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


# ---------------------------------------------------------------------------------------------------------------
# long_tail_counts


@pytest.mark.parametrize(
    ("counts", "imbalance", "expected"),
    [
        # mu = (100 / (10 * 20))^(1/2) = 0.7071: 50 * 0.7071 = 35.36 -> 36; 10 * 0.5 = 5 -> 5; ratio 100 / 5 = 20
        ([100, 50, 10], 20, [100, 36, 5]),
        # mu = (1000 / (1000 * 10))^(1/3) = 0.4642: 464.16 -> 465, 215.44 -> 216, 100.0 -> 100 (not 101: the
        # float product is 100.00000000000003)
        ([1000, 1000, 1000, 1000], 10, [1000, 465, 216, 100]),
        # data already more imbalanced than IF (ratio 10 >= 5): mu = 2 asks for 20 of the 10 tail images; keep all
        ([100, 10], 5, [100, 10]),
        # IF equal to the data's ratio: mu = 1, nothing removed
        ([40, 20, 10], 4, [40, 20, 10]),
        ([7], 50, [7]),  # one class: nothing to make long-tailed
    ],
)
def test_long_tail_counts_hand_derived(counts: list[int], imbalance: float, expected: list[int]) -> None:
    assert long_tail_counts(counts, imbalance).tolist() == expected


def test_long_tail_counts_ham10000_reaches_the_imbalance_factor() -> None:
    ham = [6705, 1113, 1099, 514, 327, 142, 115]  # README counts, sorted descending (ratio 58)
    out = long_tail_counts(ham, 100)
    assert out[0] == 6705 and out[-1] == 68  # ceil(6705 / 100) = 68: head/tail ratio is IF
    assert (np.diff(out) <= 0).all() and (out <= np.array(ham)).all()


@pytest.mark.parametrize(("counts", "imbalance"), [([10, 5], 0.5), ([10, 0], 10), ([], 10)])
def test_long_tail_counts_rejects_bad_input(counts: list[int], imbalance: float) -> None:
    with pytest.raises(ValueError):
        long_tail_counts(counts, imbalance)


# ---------------------------------------------------------------------------------------------------------------
# long_tail_subsample


def test_long_tail_subsample_equal_classes_head_is_lowest_index() -> None:
    labels = np.repeat([0, 1, 2], 10)
    # ties keep class order: mu = (10 / (10 * 10))^(1/2) = 0.3162 -> [10, ceil(3.16) = 4, ceil(1.0) = 1]
    idx = long_tail_subsample(labels, 10, seed=0)
    assert np.bincount(labels[idx], minlength=3).tolist() == [10, 4, 1]
    assert (np.diff(idx) > 0).all()  # sorted, no repeats
    # an explicit head-to-tail order makes class 2 the head
    idx2 = long_tail_subsample(labels, 10, seed=0, order=[2, 1, 0])
    assert np.bincount(labels[idx2], minlength=3).tolist() == [1, 4, 10]


def test_long_tail_subsample_sorts_by_count() -> None:
    labels = np.array([1] * 5 + [0] * 20 + [2] * 10)
    # head-to-tail: class 0 (20), class 2 (10), class 1 (5); mu = (20 / (5 * 8))^(1/2) = 0.7071
    # kept: 20, ceil(10 * 0.7071 = 7.07) = 8, ceil(5 * 0.5 = 2.5) = 3
    idx = long_tail_subsample(labels, 8, seed=1)
    assert np.bincount(labels[idx], minlength=3).tolist() == [20, 3, 8]


def test_long_tail_subsample_is_seeded() -> None:
    labels = np.repeat([0, 1, 2, 3], 50)
    a = long_tail_subsample(labels, 20, seed=3)
    assert np.array_equal(a, long_tail_subsample(labels, 20, seed=3))
    b = long_tail_subsample(labels, 20, seed=4)
    assert not np.array_equal(a, b)
    assert np.bincount(labels[a]).tolist() == np.bincount(labels[b]).tolist()


def test_long_tail_subsample_order_with_empty_class_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\[5\]"):
        long_tail_subsample(np.array([0, 0, 1]), 2, seed=0, order=[0, 1, 5])


# ---------------------------------------------------------------------------------------------------------------
# stratified_limit


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (10, [8, 1, 1]),  # quotas 8, 1.5, 0.5 -> floors 8, 1, 0 -> every class at least 1 -> 8, 1, 1
        (13, [10, 2, 1]),  # quotas 10.4, 1.95, 0.65 -> 10, 1, 1 (12) -> +1 to the largest remainder (class 1)
        (20, [16, 3, 1]),  # quotas are whole numbers
        (100, [80, 15, 5]),  # limit >= N keeps all
    ],
)
def test_stratified_limit_hand_derived(limit: int, expected: list[int]) -> None:
    labels = np.repeat([0, 1, 2], [80, 15, 5])
    idx = stratified_limit(labels, limit, seed=0)
    assert np.bincount(labels[idx], minlength=3).tolist() == expected


def test_stratified_limit_below_class_count_is_an_error() -> None:
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        stratified_limit(np.repeat([0, 1, 2], 5), 2, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# group_stratified_split


def _sizes(parts: dict[str, np.ndarray]) -> dict[str, int]:
    return {k: len(v) for k, v in parts.items()}


def test_split_singleton_groups_one_class() -> None:
    # targets 7 / 1 / 2 images; each group goes to the largest deficit (ties: split listed first):
    # train takes 6 groups (deficit 7 .. 2, tie with test at 2 -> train), test 1, train 1 (tie at 1), val 1, test 1
    labels = np.zeros(10, dtype=int)
    parts = group_stratified_split(labels, np.arange(10), FRACTIONS, seed=0)
    assert _sizes(parts) == {"train": 7, "val": 1, "test": 2}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(10))


def test_split_three_groups_cover_every_split() -> None:
    # one class, groups of 5, 1 and 1 images; targets 4.9 / 0.7 / 1.4. Three groups for three splits, so each
    # split gets one: the 5-image group first (largest deficit: train), then test (1.4 > 0.7), then val.
    labels = np.zeros(7, dtype=int)
    groups = np.array(["a"] * 5 + ["b", "c"])
    parts = group_stratified_split(labels, groups, FRACTIONS, seed=0)
    assert parts["train"].tolist() == [0, 1, 2, 3, 4]
    assert _sizes(parts) == {"train": 5, "val": 1, "test": 1}


def test_split_two_groups_both_train() -> None:
    # two single-image groups: targets 1.4 / 0.2 / 0.4. First -> train (deficit 0.4 left), second: train 0.4 ties
    # test 0.4 -> train. Fewer groups than splits: no coverage is forced.
    parts = group_stratified_split(np.zeros(2, dtype=int), ["g1", "g2"], FRACTIONS, seed=5)
    assert _sizes(parts) == {"train": 2, "val": 0, "test": 0}


def test_split_minority_images_follow_their_group() -> None:
    # group "m" holds labels 0, 0, 1: its class is 0 (majority), and its class-1 image goes with it
    labels = np.array([0, 0, 1] + [1] * 9)
    groups = np.array(["m", "m", "m"] + [f"s{i}" for i in range(9)])
    parts = group_stratified_split(labels, groups, FRACTIONS, seed=0)
    where = {s: set(v.tolist()) for s, v in parts.items()}
    home = [s for s, v in where.items() if 0 in v]
    assert len(home) == 1 and {0, 1, 2} <= where[home[0]]
    # class 0 has one group only, so it lands in train (largest target)
    assert home == ["train"]


def test_split_class_with_no_training_images_is_an_error() -> None:
    # class "b" has a single group; with test the largest fraction that group goes to test
    labels = np.array([0] * 10 + [1])
    groups = np.arange(11)
    with pytest.raises(ValueError, match=r"class 'b' has no training images") as e:
        group_stratified_split(labels, groups, {"train": 0.2, "val": 0.2, "test": 0.6}, seed=0,
                               class_names=["a", "b"])
    assert "\n" not in str(e.value)


def test_split_class_without_images_is_an_error() -> None:
    with pytest.raises(ValueError, match="class 'c' has no images"):
        group_stratified_split([0, 1, 0, 1], [0, 1, 2, 3], FRACTIONS, seed=0, num_classes=3,
                               class_names=["a", "b", "c"])


@pytest.mark.parametrize(
    "fractions",
    [{"train": 0.7, "val": 0.1, "test": 0.1}, {"train": 1.2, "val": -0.2}, {"train": 0.0, "test": 1.0}, {}],
)
def test_split_rejects_bad_fractions(fractions: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        group_stratified_split([0, 0, 0], [0, 1, 2], fractions, seed=0)


def _toy_grouped(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A HAM-like toy set: 5 classes with 300 / 80 / 30 / 6 / 2 groups of 1-4 images, one label per group."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c, n_groups in enumerate([300, 80, 30, 6, 2]):
        for g in range(n_groups):
            k = int(rng.integers(1, 5))
            labels += [c] * k
            groups += [f"c{c}g{g}"] * k
    return np.array(labels), np.array(groups)


def test_split_properties_on_a_grouped_set() -> None:
    labels, groups = _toy_grouped(0)
    parts = group_stratified_split(labels, groups, FRACTIONS, seed=11)
    everything = np.concatenate(list(parts.values()))
    assert sorted(everything.tolist()) == list(range(len(labels)))  # a partition
    seen = {s: set(groups[v].tolist()) for s, v in parts.items()}
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    for c in range(4):  # classes with >= 3 groups appear in every split
        for s, v in parts.items():
            assert (labels[v] == c).any(), (c, s)
    assert (labels[parts["train"]] == 4).any()  # the 2-group class still has training images
    for c in range(2):  # big classes: image fractions close to the targets
        n = (labels == c).sum()
        for s, f in FRACTIONS.items():
            assert abs((labels[parts[s]] == c).sum() / n - f) < 0.02
    again = group_stratified_split(labels, groups, FRACTIONS, seed=11)
    assert all(np.array_equal(parts[s], again[s]) for s in FRACTIONS)
    other = group_stratified_split(labels, groups, FRACTIONS, seed=12)
    assert not np.array_equal(parts["test"], other["test"])
