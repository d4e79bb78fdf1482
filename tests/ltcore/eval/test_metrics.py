from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from ltcore.eval.metrics import class_groups, compute_metrics, expected_calibration_error

# Hand-worked 3-class example (N = 6). Predictions (argmax) and confidences (max prob):
#   s0 true 0 [0.85, 0.10, 0.05] -> 0 right, conf 0.85
#   s1 true 0 [0.65, 0.25, 0.10] -> 0 right, conf 0.65
#   s2 true 0 [0.25, 0.65, 0.10] -> 1 wrong, conf 0.65
#   s3 true 1 [0.15, 0.75, 0.10] -> 1 right, conf 0.75
#   s4 true 1 [0.55, 0.35, 0.10] -> 0 wrong, conf 0.55
#   s5 true 2 [0.10, 0.15, 0.75] -> 2 right, conf 0.75
Y = np.array([0, 0, 0, 1, 1, 2])
P = np.array([
    [0.85, 0.10, 0.05],
    [0.65, 0.25, 0.10],
    [0.25, 0.65, 0.10],
    [0.15, 0.75, 0.10],
    [0.55, 0.35, 0.10],
    [0.10, 0.15, 0.75],
])
NAMES = ["a", "b", "c"]
COUNTS = [100, 30, 5]  # rank rule, C = 3, ceil(3/3) = 1: many a, medium b, few c

HAM_NAMES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
HAM_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}


def test_hand_worked_three_classes() -> None:
    m = compute_metrics(Y, P, NAMES, COUNTS, ece_bins=10)
    assert m["accuracy"] == pytest.approx(4 / 6)  # s0, s1, s3, s5 right
    # recalls: a 2/3, b 1/2, c 1/1 -> mean (4/6 + 3/6 + 6/6) / 3 = 13/18
    assert m["per_class_recall"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert m["balanced_accuracy"] == pytest.approx(13 / 18)
    # F1: a P=2/3 R=2/3 -> 2/3; b P=1/2 R=1/2 -> 1/2; c -> 1; macro = 13/18
    assert m["macro_f1"] == pytest.approx(13 / 18)
    # ECE, 10 bins: (0.5,0.6] {s4}: |0 - 0.55|; (0.6,0.7] {s1,s2}: |0.5 - 0.65|; (0.7,0.8] {s3,s5}: |1 - 0.75|;
    # (0.8,0.9] {s0}: |1 - 0.85| -> (1*0.55 + 2*0.15 + 2*0.25 + 1*0.15) / 6 = 1.5 / 6 = 0.25
    assert m["ece"] == pytest.approx(0.25)
    # AUC one-vs-rest, counting positive > negative pairs:
    #   a: pos .85 .65 .25 vs neg .15 .55 .10 -> 3 + 3 + 2 = 8/9
    #   b: pos .75 .35 vs neg .10 .25 .65 .15 -> 4 + 3 = 7/8
    #   c: pos .75 vs neg .05 .10 .10 .10 .10 -> 5/5 = 1
    # macro = (8/9 + 7/8 + 1) / 3 = 199/216
    assert m["per_class_auc"] == pytest.approx({"a": 8 / 9, "b": 7 / 8, "c": 1.0})
    assert m["auc_ovr_macro"] == pytest.approx(199 / 216)
    assert m["auc_ovr_macro"] == pytest.approx(roc_auc_score(Y, P, multi_class="ovr", average="macro"))
    assert m["auc_excluded_classes"] == []
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["groups"] == {"many": ["a"], "medium": ["b"], "few": ["c"]}
    assert (m["many_accuracy"], m["medium_accuracy"], m["few_accuracy"]) == pytest.approx((2 / 3, 1 / 2, 1.0))
    assert m["per_class_support"] == {"a": 3, "b": 2, "c": 1}
    json.dumps(m, allow_nan=False)  # plain JSON values only


def test_perfect_predictions_are_one_everywhere() -> None:
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    probs = np.eye(3)[y]  # one-hot on the true class
    m = compute_metrics(y, probs, NAMES, COUNTS)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc_ovr_macro", "many_accuracy", "medium_accuracy",
                "few_accuracy"):
        assert m[key] == 1.0, key
    assert all(r == 1.0 for r in m["per_class_recall"].values())
    assert m["ece"] == 0.0  # confidence 1, accuracy 1 in the single bin
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]


def test_balanced_accuracy_matches_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=50)
    logits = rng.normal(size=(50, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = compute_metrics(y, probs, list("wxyz"), [40, 20, 10, 5])
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(axis=1)))
    assert m["auc_ovr_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_ece_calibrated_and_overconfident() -> None:
    # Confidence 0.9 everywhere and 9 of 10 right: calibrated -> 0.
    y = np.array([0] * 9 + [1])
    probs = np.tile([0.9, 0.1], (10, 1))
    assert expected_calibration_error(y, probs) == pytest.approx(0.0)
    # Confidence 0.7, all right: |1 - 0.7| = 0.3.
    assert expected_calibration_error(np.zeros(4, dtype=int), np.tile([0.7, 0.3], (4, 1))) == pytest.approx(0.3)


def test_ece_edge_confidence_goes_to_lower_bin() -> None:
    # 0.7 sits on the edge of (0.6, 0.7] and (0.7, 0.8] with 10 bins; one wrong at 0.7 and one right at 0.75
    # must be separate bins: (|0 - 0.7| + |1 - 0.75|) / 2 = 0.475 (0.225 if they shared a bin).
    probs = np.array([[0.7, 0.3], [0.75, 0.25]])
    assert expected_calibration_error(np.array([1, 0]), probs, n_bins=10) == pytest.approx(0.475)


def test_absent_class_is_excluded_from_auc_and_group_is_null() -> None:
    y = Y[:5]  # class c never appears
    m = compute_metrics(y, P[:5], NAMES, COUNTS)
    assert m["per_class_recall"]["c"] is None
    assert m["few_accuracy"] is None  # group {c} has no evaluated class: null, not 0
    assert m["auc_excluded_classes"] == ["c"]
    assert m["per_class_auc"]["c"] is None
    # a: pos .85 .65 .25 vs neg .15 .55 -> 2 + 2 + 1 = 5/6; b: pos .75 .35 vs neg .10 .25 .65 -> 3 + 2 = 5/6
    assert m["auc_ovr_macro"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # over present classes only


def test_single_present_class_has_no_auc() -> None:
    m = compute_metrics(np.array([0, 0]), P[:2], NAMES, COUNTS)
    assert m["auc_ovr_macro"] is None


def test_ham10000_rank_groups() -> None:
    groups = class_groups(HAM_COUNTS, HAM_NAMES, rule="rank")
    named = {g: [HAM_NAMES[i] for i in idx] for g, idx in groups.items()}
    assert named == {"many": ["nv", "mel", "bkl"], "medium": ["bcc"], "few": ["akiec", "vasc", "df"]}


def test_ham10000_count_rule_leaves_few_empty() -> None:
    groups = class_groups(HAM_COUNTS, HAM_NAMES, rule="count")
    assert groups["few"] == []  # every HAM10000 class has >= 115 training images
    assert len(groups["many"]) == 7
    y = np.arange(7)
    m = compute_metrics(y, np.eye(7)[y], HAM_NAMES, HAM_COUNTS, group_rule="count")
    assert m["few_accuracy"] is None and m["medium_accuracy"] is None and m["many_accuracy"] == 1.0


def test_count_rule_thresholds() -> None:
    # many > 100, few < 20, medium 20..100 inclusive
    groups = class_groups([150, 100, 20, 19], list("abcd"), rule="count")
    assert groups == {"many": [0], "medium": [1, 2], "few": [3]}


@pytest.mark.parametrize(("n", "sizes"), [(1, (1, 0, 0)), (2, (1, 0, 1)), (4, (2, 0, 2)), (5, (2, 1, 2)),
                                          (7, (3, 1, 3)), (10, (4, 2, 4))])
def test_rank_rule_group_sizes(n: int, sizes: tuple[int, int, int]) -> None:
    groups = class_groups(list(range(n, 0, -1)), [str(i) for i in range(n)])
    assert (len(groups["many"]), len(groups["medium"]), len(groups["few"])) == sizes
    assert sorted(groups["many"] + groups["medium"] + groups["few"]) == list(range(n))


@pytest.mark.parametrize(("y", "probs", "match"), [
    (np.array([0, 3]), P[:2], "outside"),
    (np.array([0, 1, 2]), P[:2], "shape"),
    (np.array([0, 1]), P[:2] * 2, "sum to 1"),
    (np.array([], dtype=int), np.zeros((0, 3)), "non-empty"),
])
def test_bad_input_raises(y: np.ndarray, probs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(y, probs, NAMES, COUNTS)


def test_bad_counts_and_rule_raise() -> None:
    with pytest.raises(ValueError, match="train_counts"):
        compute_metrics(Y, P, NAMES, [1, 2])
    with pytest.raises(ValueError, match="unknown group_rule"):
        compute_metrics(Y, P, NAMES, COUNTS, group_rule="median")
