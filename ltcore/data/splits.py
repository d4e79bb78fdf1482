"""Long-tail subsampling and the leakage-free, class-stratified train/val/test split (pure numpy).

Three functions, all deterministic for a seed, all working on integer class labels ``labels (N,)``:

- :func:`long_tail_counts` / :func:`long_tail_subsample` — the LMD long-tail construction (Pan et al.,
  arXiv 2502.03238, used there to build ISIC2019-LT): sort classes by count and keep
  ``n'_i = ceil(n_i * mu^i)`` images of the i-th class, ``mu = (n_max / (n_min * IF))^(1 / (C - 1))``.
- :func:`stratified_limit` — keep a fixed number of rows with the class proportions (smoke tests).
- :func:`group_stratified_split` — whole groups (patients, lesions) go to one split each, stratified by
  class, and every class with at least as many groups as there are splits appears in every split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# n_i * mu^i is computed in floating point: 1000 * (0.1 ** (1/3)) ** 3 comes out as 100.00000000000003, and a
# plain ceil would keep 101 where the construction means 100.
_CEIL_TOL = 1e-9


def _ceil(x: float) -> int:
    return math.ceil(x - _CEIL_TOL)


def long_tail_counts(counts_sorted: Sequence[int] | np.ndarray, imbalance_factor: float) -> np.ndarray:
    """Per-class counts after the LMD long-tail construction.

    Args:
        counts_sorted: ``(C,)`` image counts from head to tail (the LMD recipe sorts them descending).
        imbalance_factor: IF >= 1, the target ratio between the head and the tail class after subsampling.

    Returns:
        ``(C,)`` int64 counts ``n'_i = min(n_i, ceil(n_i * mu^i))`` with ``mu = (n_0 / (n_{C-1} * IF))^(1/(C-1))``,
        so ``n'_0 = n_0`` and ``n'_{C-1} = ceil(n_0 / IF)``: the head keeps every image and the result has
        head/tail ratio IF.

    What IF means relative to the data's own ratio ``r = n_0 / n_{C-1}``:

    - ``r < IF`` (the usual case, e.g. ISIC2019 with r = 54 made IF = 100): ``mu < 1``, every class but the head
      shrinks geometrically and the result has ratio IF — the data is made *more* imbalanced.
    - ``r >= IF``: ``mu >= 1`` and the formula asks for at least ``n_i`` images of every class; the construction
      cannot add images, so every class keeps all of its images (the ``min``) and the ratio stays r. IF is
      therefore a lower bound on the imbalance, never a request to rebalance.

    Raises:
        ValueError: IF < 1, or a count that is not positive.

    >>> long_tail_counts([100, 50, 10], 20).tolist()  # mu = (100 / (10 * 20)) ** 0.5 = 0.7071
    [100, 36, 5]
    """
    n = np.asarray(counts_sorted, dtype=np.int64)
    if imbalance_factor < 1:
        raise ValueError(f"imbalance factor must be >= 1 (head/tail ratio after subsampling), got {imbalance_factor}")
    if n.ndim != 1 or n.size == 0 or (n <= 0).any():
        raise ValueError(f"class counts must be a non-empty list of positive numbers, got {n.tolist()}")
    c = n.size
    if c == 1:
        return n.copy()
    mu = (n[0] / (n[-1] * imbalance_factor)) ** (1.0 / (c - 1))
    kept = [min(int(n_i), _ceil(float(n_i) * mu**i)) for i, n_i in enumerate(n)]
    return np.asarray(kept, dtype=np.int64)


def long_tail_subsample(
    labels: Sequence[int] | np.ndarray,
    imbalance_factor: float,
    seed: int,
    *,
    order: Sequence[int] | None = None,
) -> np.ndarray:
    """Indices of a long-tailed subset of ``labels (N,)`` (the LMD construction, see :func:`long_tail_counts`).

    Args:
        labels: ``(N,)`` integer class labels.
        imbalance_factor: IF >= 1.
        seed: which images of each class are kept (uniformly at random, without replacement).
        order: class indices from head to tail. Default: the classes present, by count descending, ties by class
            index (the LMD recipe). An explicit order fixes which class becomes the tail when counts are nearly
            equal (the embedded digits); classes not listed lose all their images.

    Returns:
        ``(M,)`` int64 indices into ``labels``, sorted ascending.
    """
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        return np.zeros(0, dtype=np.int64)
    present = np.unique(y)
    counts = np.bincount(y)
    if order is None:
        # stable sort on -count keeps the class index order among ties
        ranked = present[np.argsort(-counts[present], kind="stable")]
    else:
        ranked = np.asarray(order, dtype=np.int64)
        missing = [int(c) for c in ranked if c >= counts.size or counts[c] == 0]
        if missing:
            raise ValueError(f"classes {missing} in the head-to-tail order have no images")
    keep = long_tail_counts(counts[ranked], imbalance_factor)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(y == c), size=int(k), replace=False) for c, k in zip(ranked, keep)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_limit(labels: Sequence[int] | np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of ``limit`` rows of ``labels (N,)`` with the class proportions kept (largest remainder).

    Every class present keeps at least one row, so ``limit`` must be at least the number of classes present.
    ``limit >= N`` keeps everything. Returns ``(min(limit, N),)`` int64 indices, sorted ascending.
    """
    y = np.asarray(labels, dtype=np.int64)
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if limit >= y.size:
        return np.arange(y.size, dtype=np.int64)
    present = np.unique(y)
    if limit < present.size:
        raise ValueError(f"limit {limit} is smaller than the number of classes ({present.size}); raise it")
    n = np.bincount(y)[present]
    quota = limit * n / y.size
    k = np.minimum(np.maximum(np.floor(quota).astype(np.int64), 1), n)
    while k.sum() < limit:  # hand the rest to the largest remainders (ties: lower class index)
        room = np.where(k < n, quota - k, -np.inf)
        k[int(np.argmax(room))] += 1
    while k.sum() > limit:  # the floor of 1 overshot: take back from the most over-served class
        over = np.where(k > 1, k - quota, -np.inf)
        k[int(np.argmax(over))] -= 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(y == c), size=int(m), replace=False) for c, m in zip(present, k)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _check_fractions(fractions: Mapping[str, float], train_split: str) -> None:
    if not fractions:
        raise ValueError("split fractions are empty; give e.g. train=0.7, val=0.1, test=0.2")
    bad = {k: v for k, v in fractions.items() if not (v >= 0)}
    if bad:
        raise ValueError(f"split fractions must be >= 0, got {bad}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        shown = ", ".join(f"{k}={v:g}" for k, v in fractions.items())
        raise ValueError(f"split fractions must sum to 1, got {shown} (sum {total:g}); fix them")
    if fractions.get(train_split, 0.0) <= 0:
        raise ValueError(f"split fraction of {train_split!r} must be > 0, got {fractions.get(train_split)}")


def group_stratified_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[object] | np.ndarray,
    fractions: Mapping[str, float],
    seed: int,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    train_split: str = "train",
) -> dict[str, np.ndarray]:
    """Split images into ``fractions`` so that no group crosses splits, stratified by class.

    Args:
        labels: ``(N,)`` integer class labels.
        groups: ``(N,)`` group keys (patient, lesion); images of one group always land in the same split.
        fractions: split name -> fraction of each class's images, e.g. ``{"train": .7, "val": .1, "test": .2}``;
            must be >= 0 and sum to 1.
        seed: the assignment is a deterministic function of (labels, groups, fractions, seed).
        num_classes: C; every class ``0..C-1`` must end up with training images. Default ``max(labels) + 1``.
        class_names: names used in error messages.
        train_split: the split that must hold every class.

    Returns:
        split name -> ``(n_split,)`` int64 image indices, sorted ascending; every index in exactly one split.

    Algorithm. A group's class is its majority label (ties: the lower class index); its other images go with
    it. Per class, the class's groups are shuffled with ``seed`` and then ordered largest first (big groups are
    hardest to place), and each group goes to the split with the largest remaining deficit ``target - assigned``
    in images (ties: the split listed first), where ``target = fraction * images of the class``. When a class
    has at least as many groups as there are splits with a positive fraction, the last groups are forced into
    the splits still empty, so that class appears in every split.

    Raises:
        ValueError: bad fractions; a class with no images at all; a class with no training images after the
            split (name given) — e.g. a class with a single group when the train fraction is not the largest.
    """
    y = np.asarray(labels, dtype=np.int64)
    g = np.asarray(groups)
    if y.shape != g.shape or y.ndim != 1:
        raise ValueError(f"labels and groups must be 1-d and of equal length, got {y.shape} and {g.shape}")
    _check_fractions(fractions, train_split)
    if y.size == 0:
        raise ValueError("cannot split an empty dataset")
    c_total = int(num_classes) if num_classes is not None else int(y.max()) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(c_total)]

    img_counts = np.bincount(y, minlength=c_total)
    empty_classes = [names[c] for c in range(c_total) if img_counts[c] == 0]
    if empty_classes:
        raise ValueError(f"class {empty_classes[0]!r} has no images ({len(empty_classes)} such class(es)); "
                         "remove it from the class list or add images")

    split_names = list(fractions)
    frac = np.array([fractions[s] for s in split_names], dtype=np.float64)
    active = [i for i, f in enumerate(frac) if f > 0]

    _, ginv = np.unique(g, return_inverse=True)
    n_groups = int(ginv.max()) + 1
    sizes = np.bincount(ginv, minlength=n_groups)
    per_group = np.bincount(ginv * c_total + y, minlength=n_groups * c_total).reshape(n_groups, c_total)
    gclass = per_group.argmax(axis=1)  # majority label; argmax takes the lowest index among ties

    rng = np.random.default_rng(seed)
    assign = np.full(n_groups, -1, dtype=np.int64)
    for c in range(c_total):
        gs = np.flatnonzero(gclass == c)
        if gs.size == 0:
            continue
        gs = rng.permutation(gs)
        gs = gs[np.argsort(-sizes[gs], kind="stable")]  # largest first; the shuffle orders equal sizes
        target = frac * sizes[gs].sum()
        filled = np.zeros(len(split_names))
        cover_all = gs.size >= len(active)
        for k, grp in enumerate(gs):
            empty = [s for s in active if filled[s] == 0]
            remaining = gs.size - k
            candidates = empty if cover_all and remaining <= len(empty) else active
            # round so that float noise in fraction * total does not decide ties between splits
            s = max(candidates, key=lambda s: (round(target[s] - filled[s], 9), -s))
            assign[grp] = s
            filled[s] += sizes[grp]

    img_split = assign[ginv]
    ti = split_names.index(train_split)
    train_counts = np.bincount(y[img_split == ti], minlength=c_total)
    for c in range(c_total):
        if train_counts[c] == 0:
            n_grp = int((per_group[:, c] > 0).sum())
            raise ValueError(f"class {names[c]!r} has no training images after the group split ({img_counts[c]} "
                             f"image(s) in {n_grp} group(s)); add images, raise the train fraction, or drop the class")
    return {s: np.flatnonzero(img_split == i).astype(np.int64) for i, s in enumerate(split_names)}


def extend_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[object] | np.ndarray,
    fractions: Mapping[str, float],
    seed: int,
    fixed: Mapping[str, str],
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    train_split: str = "train",
) -> dict[str, np.ndarray]:
    """Like :func:`group_stratified_split`, but groups in ``fixed`` (group -> split name) keep that split; only the
    other groups are split, by :func:`group_stratified_split`'s seeded rule applied to them alone.

    This freezes a test set across dataset versions (``fixed`` = the previous version's assignment) and honours a
    publisher's predefined split (``fixed`` = the split column). Returns split name -> ``(n_split,)`` int64 indices,
    sorted ascending; every index in exactly one split.

    Raises:
        ValueError: a fixed split name not in ``fractions``; bad fractions; a class without training images.

    >>> parts = extend_split([0, 0, 1, 1], ["a", "b", "c", "d"], {"train": 0.5, "test": 0.5}, 0, {"a": "test"})
    >>> parts["test"].tolist()[0], 0 in parts["train"].tolist()
    (0, False)
    """
    y = np.asarray(labels, dtype=np.int64)
    g = np.asarray(groups)
    _check_fractions(fractions, train_split)
    unknown = sorted({str(s) for s in fixed.values() if s not in fractions})
    if unknown:
        raise ValueError(f"predefined split {unknown[0]!r} is not one of {', '.join(fractions)}")
    c_total = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if y.size else 0)
    names = list(class_names) if class_names is not None else [str(c) for c in range(c_total)]
    split_of = np.array([fixed.get(str(k), "") for k in g.tolist()], dtype=object)
    new = np.flatnonzero(split_of == "")
    if new.size:
        present = np.unique(y[new])  # the new rows may hold only some classes: split them among themselves
        remap = np.searchsorted(present, y[new])
        parts = group_stratified_split(remap, g[new], fractions, seed, num_classes=present.size,
                                       class_names=[names[c] for c in present], train_split=train_split)
        for s, idx in parts.items():
            split_of[new[idx]] = s
    train_counts = np.bincount(y[split_of == train_split], minlength=c_total)
    for c in range(c_total):
        if train_counts[c] == 0:
            raise ValueError(f"class {names[c]!r} has no training images with the fixed splits; add training images "
                             "of it or drop the class")
    return {s: np.flatnonzero(split_of == s).astype(np.int64) for s in fractions}
