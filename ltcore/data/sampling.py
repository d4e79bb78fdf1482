"""Class-rebalanced sampling as pure NumPy functions: class counts -> probabilities -> per-sample repeats.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020, arXiv 1910.09217:
the probability of drawing class ``j`` is ``p_j = n_j^q / sum_i n_i^q`` (``q = 1`` instance-balanced, ``q = 0``
class-balanced, ``q = 0.5`` square-root), and progressive-balanced sampling moves from instance- to
class-balanced over the epochs.

A dataflow engine (Ray Data) cannot sample indices from a global sampler, so the probabilities are turned into
a per-sample expected repeat count ``r_i = p_{y_i} * M / n_{y_i}`` (``M`` the epoch size, ``N`` by default) and
rounded stochastically: sample ``i`` appears ``floor(r_i) + Bernoulli(r_i - floor(r_i))`` times. Class ``j``
then appears ``p_j * M`` times in expectation. The rounding draws are keyed on ``(seed, epoch, key)``, so each
epoch gets new draws and the same seed gives the same epochs; with ``row_keys`` (stable per-row ids) the draw of
each row depends on that row alone, not on how rows are batched or ordered.

Which training stream draws which classes at which epoch (``stage1.q``, ``stage1.progressive``,
``stage1.pk_classes``, SPMix's tail stream) is decided in one place, :func:`stage1_sampling`.

No Ray and no torch here: :mod:`ltcore.data.ingest` applies these functions inside Ray Data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_U53 = float(2**-53)


def _counts_array(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence of class counts, got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.number) or np.any(c < 0) or np.any(c != np.floor(c)):
        raise ValueError(f"counts must be non-negative integers, got {c.tolist()}")
    if c.sum() <= 0:
        raise ValueError("counts are all zero: the split has no samples")
    return c.astype(np.int64)


def _check_seed(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def class_probabilities(counts: Sequence[int] | np.ndarray, q: float) -> np.ndarray:
    """Class sampling probabilities ``p_j = n_j^q / sum_i n_i^q``.

    Args:
        counts: ``(C,)`` training-split class counts ``n_j``.
        q: exponent; 1 instance-balanced, 0 class-balanced, 0.5 square-root.

    Returns:
        ``(C,)`` float64 probabilities summing to 1. A class with ``n_j = 0`` gets ``p_j = 0`` (it cannot be
        drawn), also for ``q = 0`` where ``0^0`` would otherwise count it.

    Raises:
        ValueError: counts not non-negative integers or all zero; q not finite.
    """
    c = _counts_array(counts)
    if not np.isfinite(q):
        raise ValueError(f"q must be a finite number, got {q!r}")
    present = c > 0
    w = np.zeros(c.shape, np.float64)
    w[present] = c[present].astype(np.float64) ** float(q)
    return w / w.sum()


def progressive_probabilities(counts: Sequence[int] | np.ndarray, epoch: int, total_epochs: int) -> np.ndarray:
    """Progressive-balanced probabilities ``p_j(t) = (1 - t/T) * p_j^IB + (t/T) * p_j^CB`` (Kang et al.).

    ``t`` is the 0-based ``epoch`` and ``T`` is ``total_epochs``: epoch 0 is instance-balanced, and ``t = T``
    (allowed) would be fully class-balanced, so the last training epoch ``T - 1`` is almost class-balanced.

    Returns:
        ``(C,)`` float64 probabilities.

    Raises:
        ValueError: ``total_epochs < 1`` or ``epoch`` outside ``[0, total_epochs]``.
    """
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if not 0 <= epoch <= total_epochs:
        raise ValueError(f"epoch must be in [0, total_epochs={total_epochs}], got {epoch}")
    t = epoch / total_epochs
    return (1.0 - t) * class_probabilities(counts, 1.0) + t * class_probabilities(counts, 0.0)


@dataclass(frozen=True)
class StreamSampling:
    """How one training stream draws its classes in every epoch.

    Args:
        q: exponent of ``p_j ~ n_j^q`` in ``[0, 1]``: 1 instance-balanced (every row once), 0 class-balanced;
            ignored when ``progressive``.
        progressive: progressive-balanced (:func:`progressive_probabilities`) over the run's epochs.
        seed_offset: added to the run's seed, so that two streams of one run draw independently.

    Raises:
        ValueError: ``q`` outside ``[0, 1]`` or ``seed_offset < 0``.
    """

    q: float = 1.0
    progressive: bool = False
    seed_offset: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.q <= 1.0:
            raise ValueError(f"q must be in [0, 1] (1 instance-balanced, 0 class-balanced), got {self.q!r}")
        _check_seed("seed_offset", self.seed_offset)

    @property
    def is_identity(self) -> bool:
        """Every row exactly once per epoch (q = 1, not progressive): the draws can be skipped."""
        return self.q == 1.0 and not self.progressive

    def probabilities(self, counts: Sequence[int] | np.ndarray, epoch: int, total_epochs: int) -> np.ndarray:
        """Class probabilities ``(C,)`` in 0-based ``epoch`` of ``total_epochs`` (epochs past the end: the last
        schedule value)."""
        if self.progressive:
            return progressive_probabilities(counts, min(epoch, total_epochs), total_epochs)
        return class_probabilities(counts, self.q)


def stage1_sampling(*, q: float, progressive: bool, pk_classes: int, tail_stream: bool) -> dict[str, StreamSampling]:
    """The stage-1 sampling policy: which stream draws which classes (the config's ``stage1`` section).

    - ``"train"``, the stream every step trains on: ``p_j ~ n_j^q`` (``stage1.q``), or progressive-balanced
      when ``progressive`` (``q`` then ignored). P x K batches (``pk_classes > 0``) are regrouped from it
      (:class:`~ltcore.methods.pk.PKBatcher`); from an instance-balanced stream the rare classes would gate them
      and the head classes overflow their buffers, so at q = 1 without a progressive schedule it is
      class-balanced instead (a q below 1 or a progressive schedule is kept).
    - ``"tail"``, only with ``tail_stream`` (SPMix pastes tail-class patches into the instance stream's images):
      class-balanced at every epoch, drawn with the run's seed + 1 so that it is independent of ``"train"``.

    Returns:
        Stream name -> :class:`StreamSampling`; ``policy[name].probabilities(counts, epoch, epochs)`` are that
        stream's class probabilities in an epoch.

    Raises:
        ValueError: ``q`` outside ``[0, 1]`` or ``pk_classes < 0``.
    """
    if pk_classes < 0:
        raise ValueError(f"pk_classes must be >= 0 (0 = off), got {pk_classes}")
    train = StreamSampling(q=q, progressive=progressive)
    if pk_classes > 0 and train.is_identity:
        train = StreamSampling(q=0.0)
    out = {"train": train}
    if tail_stream:
        out["tail"] = StreamSampling(q=0.0, seed_offset=1)
    return out


def repeat_factors(
    labels: Sequence[int] | np.ndarray,
    counts: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    *,
    epoch_size: int | None = None,
) -> np.ndarray:
    """Expected number of draws of each sample in one epoch.

    Args:
        labels: ``(n,)`` class index of each sample (any subset of the split, e.g. one Ray Data block).
        counts: ``(C,)`` class counts of the whole split; ``N = sum(counts)``.
        probs: ``(C,)`` class probabilities (from :func:`class_probabilities` or
            :func:`progressive_probabilities`).
        epoch_size: ``M``, the expected number of draws per epoch; ``None`` keeps ``N``.

    Returns:
        ``(n,)`` float64 factors; summed over the whole split they give ``M``.

    Raises:
        ValueError: a label outside ``[0, C)`` or of a class whose count is 0; probabilities of the wrong
            length, negative, or not summing to 1; ``epoch_size < 1``.
    """
    c = _counts_array(counts)
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.shape != c.shape:
        raise ValueError(f"probs has shape {p.shape} but counts has {c.shape}; give one probability per class")
    if np.any(p < 0) or not np.isclose(p.sum(), 1.0, rtol=0, atol=1e-9):
        raise ValueError(f"probs must be non-negative and sum to 1, got {p.tolist()}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= c.size):
        raise ValueError(f"labels must lie in [0, {c.size}), got values in [{y.min()}, {y.max()}]")
    if y.size and np.any(c[y] == 0):
        bad = sorted(set(y[c[y] == 0].tolist()))
        raise ValueError(f"labels {bad} have a class count of 0 in counts; counts must come from the same split")
    n_total = int(c.sum())
    m = n_total if epoch_size is None else int(epoch_size)
    if m < 1:
        raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")
    # r_i = p_{y_i} * M / n_{y_i}   (M = N unless an epoch size is configured)
    r = p[y] * m / c[y]
    # p_j * M / n_j is an exact integer for q = 1 (= M / N when M is a multiple of N) but floating point may give
    # 0.9999999999999999, which stochastic rounding would turn into 0 once in 10^16 draws; snap such values.
    snapped = np.round(r)
    return np.where(np.abs(r - snapped) < 1e-9, snapped, r)


def epoch_rng(seed: int, epoch: int, key: int = 0) -> np.random.Generator:
    """NumPy generator keyed on ``(seed, epoch, key)``: independent streams for every epoch and key."""
    return np.random.default_rng(
        np.random.SeedSequence((_check_seed("seed", seed), _check_seed("epoch", epoch), _check_seed("key", key)))
    )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014), vectorised; uint64 -> well-mixed uint64."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def id_keys(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Stable 64-bit key of each row id (BLAKE2b), the same in every process: ``(n,)`` uint64."""
    out = np.empty(len(ids), np.uint64)
    for i, s in enumerate(ids):
        b = s if isinstance(s, bytes) else str(s).encode("utf-8")
        out[i] = int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")
    return out


def row_uniforms(row_keys: np.ndarray, seed: int, epoch: int, key: int = 0) -> np.ndarray:
    """Uniform ``[0, 1)`` draw per row from ``(seed, epoch, key, row_key)`` alone: ``(n,)`` float64.

    Counter-based (hash, not a sequential generator): a row's draw does not depend on which other rows are in its
    batch or in what order they come, so a distributed read and a local read give the same epoch.
    """
    seq = np.random.SeedSequence((_check_seed("seed", seed), _check_seed("epoch", epoch), _check_seed("key", key)))
    base = seq.generate_state(1, dtype=np.uint64)[0]
    mixed = _splitmix64(np.asarray(row_keys, dtype=np.uint64) ^ base)
    return (mixed >> np.uint64(11)).astype(np.float64) * _U53


def stochastic_round(
    factors: np.ndarray, rng: np.random.Generator | None = None, *, uniforms: np.ndarray | None = None
) -> np.ndarray:
    """Round each factor to ``floor(r) + 1`` with probability ``r - floor(r)``, else ``floor(r)``.

    The expectation is ``r`` exactly. Give either a generator or precomputed ``uniforms`` ``(n,)`` in ``[0, 1)``.

    Returns:
        ``(n,)`` int64 repeat counts.
    """
    r = np.asarray(factors, dtype=np.float64)
    if np.any(r < 0) or not np.all(np.isfinite(r)):
        raise ValueError("factors must be finite and non-negative")
    if (rng is None) == (uniforms is None):
        raise ValueError("give exactly one of rng or uniforms")
    u = rng.random(r.shape) if rng is not None else np.asarray(uniforms, dtype=np.float64)
    if u.shape != r.shape:
        raise ValueError(f"uniforms has shape {u.shape} but factors has {r.shape}")
    base = np.floor(r)
    return (base + (u < r - base)).astype(np.int64)


def draw_repeats(
    labels: Sequence[int] | np.ndarray,
    counts: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    seed: int,
    epoch: int,
    key: int = 0,
    *,
    row_keys: np.ndarray | None = None,
    epoch_size: int | None = None,
) -> np.ndarray:
    """One epoch's repeat count per sample: :func:`repeat_factors` + :func:`stochastic_round`.

    Args:
        labels: ``(n,)`` class indices.
        counts: ``(C,)`` class counts of the whole split.
        probs: ``(C,)`` class probabilities.
        seed, epoch, key: the draw is a function of these (and of ``row_keys`` when given).
        row_keys: ``(n,)`` uint64 stable per-row keys (:func:`id_keys`); each row's draw then depends only on
            ``(seed, epoch, key, row_key)``. Without them a generator keyed on ``(seed, epoch, key)`` draws in
            order, so the result depends on the order of ``labels``.
        epoch_size: expected draws per epoch over the whole split; ``None`` = ``N``.

    Returns:
        ``(n,)`` int64 repeats; ``np.repeat(np.arange(n), repeats)`` are the epoch's sample indices.
    """
    r = repeat_factors(labels, counts, probs, epoch_size=epoch_size)
    if row_keys is None:
        return stochastic_round(r, epoch_rng(seed, epoch, key))
    if len(row_keys) != len(r):
        raise ValueError(f"row_keys has {len(row_keys)} entries but labels has {len(r)}")
    return stochastic_round(r, uniforms=row_uniforms(row_keys, seed, epoch, key))


def pk_batches(
    labels: Sequence[int] | np.ndarray,
    num_classes_per_batch: int,
    samples_per_class: int,
    seed: int,
    epoch: int,
    num_batches: int,
) -> list[np.ndarray]:
    """Class-balanced P x K batches for metric losses: P distinct classes, K samples of each.

    Classes are drawn uniformly without replacement among those present in ``labels``; within a class, K samples
    are drawn without replacement, or with replacement when the class has fewer than K.

    Args:
        labels: ``(N,)`` class index of each sample.
        num_classes_per_batch: P.
        samples_per_class: K.
        seed, epoch: the batches are a function of these.
        num_batches: how many batches to return.

    Returns:
        ``num_batches`` int64 arrays of shape ``(P * K,)`` with indices into ``labels``; each holds K
        consecutive indices per class.

    Raises:
        ValueError: P larger than the number of classes present, P or K < 1, or ``num_batches < 0``.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    if num_classes_per_batch < 1 or samples_per_class < 1:
        raise ValueError(f"num_classes_per_batch and samples_per_class must be >= 1, got "
                         f"{num_classes_per_batch} and {samples_per_class}")
    if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")
    classes = np.unique(y)
    if num_classes_per_batch > classes.size:
        raise ValueError(f"num_classes_per_batch={num_classes_per_batch} but only {classes.size} classes are "
                         "present; lower it (stage1.pk_classes)")
    members = {int(c): np.flatnonzero(y == c) for c in classes}
    rng = epoch_rng(seed, epoch, key=1)  # key 1: independent of the repeat draws (key 0) of the same epoch
    out = []
    for _ in range(num_batches):
        chosen = rng.choice(classes, size=num_classes_per_batch, replace=False)
        parts = []
        for c in chosen:
            idx = members[int(c)]
            parts.append(rng.choice(idx, size=samples_per_class, replace=idx.size < samples_per_class))
        out.append(np.concatenate(parts).astype(np.int64))
    return out
