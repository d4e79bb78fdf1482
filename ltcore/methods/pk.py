"""P x K class-balanced batches from a stream of row batches (for the metric losses, METHODS.md section 2).

Metric losses (batch-hard triplet, class-centre triplet) need several samples of several classes in every
batch. A streaming reader (Ray Data ``iter_torch_batches``) cannot index the dataset, so
:class:`PKBatcher` regroups the batches it is given: rows are buffered per class, and a batch of
``P`` classes x ``K`` rows is emitted whenever ``P`` classes have at least ``K`` buffered rows. Feed it a
class-rebalanced stream (``stage1.q = 0``); with an instance-balanced stream the rare classes gate the output
and the head classes overflow their buffers (bounded by ``max_per_class``, oldest rows dropped).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ltcore.data.sampling import epoch_rng

__all__ = ["PKBatcher"]

_RNG_KEY = 2  # independent of the repeat draws (key 0) and of sampling.pk_batches (key 1) of the same epoch


class PKBatcher:
    """Regroup a stream of row batches into batches of ``P`` classes x ``K`` rows.

    Every yielded batch is a dict with the input's keys, ``P * K`` rows, ``K`` consecutive rows per class
    (classes in drawn order). Rows are buffered per class; whenever ``P`` or more classes hold ``>= K`` rows,
    ``P`` of them are drawn uniformly without replacement and ``K`` rows of each are drawn uniformly without
    replacement from its buffer (a local shuffle). When the stream ends, the leftovers are flushed: while at
    least ``P`` classes still hold rows, ``P`` of them are drawn and a class with fewer than ``K`` rows is
    **topped up by repetition** (its rows plus rows drawn again with replacement from them, as
    :func:`~ltcore.data.sampling.pk_batches` does for small classes); rows left when fewer than ``P`` classes
    remain are dropped. The draws depend only on ``(seed, epoch)`` and the input stream, so the same stream gives
    the same batches; :meth:`set_epoch` changes them.

    Args:
        num_classes_per_batch: P >= 1.
        samples_per_class: K >= 1.
        seed: seed of the draws.
        max_per_class: buffer cap per class; beyond it the oldest rows are dropped (counted in ``dropped``).
            Default ``16 * K``.

    Attributes:
        dropped: rows discarded in the last pass (buffer overflow and leftovers).
        repeated: extra row copies made by top-ups in the last pass.

    Raises:
        ValueError: on P or K < 1, ``max_per_class < K``, or (while iterating) a batch without an integer
            ``label`` column or with columns of different lengths or keys.
    """

    def __init__(self, num_classes_per_batch: int, samples_per_class: int, seed: int = 0,
                 max_per_class: int | None = None) -> None:
        if num_classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError(f"num_classes_per_batch (P) and samples_per_class (K) must be >= 1, got "
                             f"{num_classes_per_batch} and {samples_per_class}")
        cap = 16 * samples_per_class if max_per_class is None else int(max_per_class)
        if cap < samples_per_class:
            raise ValueError(f"max_per_class must be >= samples_per_class ({samples_per_class}), got {cap}")
        self.p, self.k, self.seed, self.max_per_class = int(num_classes_per_batch), int(samples_per_class), seed, cap
        self.epoch = 0
        self.dropped = 0
        self.repeated = 0

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch`` for the next pass."""
        self.epoch = int(epoch)

    def __call__(self, batches: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        """Yield P x K batches from ``batches`` (dicts of ``(n, ...)`` tensors with an integer ``label (n,)``)."""
        rng = epoch_rng(self.seed, self.epoch, key=_RNG_KEY)
        self.dropped = self.repeated = 0
        buf: dict[int, dict[str, torch.Tensor]] = {}
        keys: tuple[str, ...] | None = None
        for i, raw in enumerate(batches):
            batch = self._check(raw, i, keys)
            keys = tuple(sorted(batch))
            self._add(buf, batch)
            while True:
                ready = [c for c in sorted(buf) if _size(buf[c]) >= self.k]
                if len(ready) < self.p:
                    break
                yield self._emit(buf, ready, rng)
        while True:
            left = [c for c in sorted(buf) if _size(buf[c]) > 0]
            if len(left) < self.p:
                break
            yield self._emit(buf, left, rng)
        self.dropped += sum(_size(b) for b in buf.values())

    # -- internals ------------------------------------------------------------------------------------------

    @staticmethod
    def _check(raw: Mapping[str, Any], i: int, keys: tuple[str, ...] | None) -> dict[str, torch.Tensor]:
        if "label" not in raw:
            raise ValueError(f"PKBatcher: batch {i} has no 'label' column (keys: {sorted(raw)})")
        batch = {}
        for k, v in raw.items():
            try:
                batch[k] = torch.as_tensor(v)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"PKBatcher: column {k!r} of batch {i} is not a tensor-like array") from None
        y = batch["label"]
        if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"PKBatcher: 'label' of batch {i} must be a 1-D integer tensor, got {y.dtype} "
                             f"{tuple(y.shape)}")
        n = y.shape[0]
        for k, v in batch.items():
            if v.ndim == 0 or v.shape[0] != n:
                raise ValueError(f"PKBatcher: column {k!r} of batch {i} has shape {tuple(v.shape)}, expected {n} rows")
        if keys is not None and tuple(sorted(batch)) != keys:
            raise ValueError(f"PKBatcher: batch {i} has columns {sorted(batch)}, earlier batches had {list(keys)}")
        return batch

    def _add(self, buf: dict[int, dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]) -> None:
        y = batch["label"]
        for c in torch.unique(y).tolist():
            idx = (y == c).nonzero().squeeze(1)
            rows = {k: v[idx] for k, v in batch.items()}
            old = buf.get(int(c))
            merged = rows if old is None else {k: torch.cat([old[k], rows[k]]) for k in rows}
            over = _size(merged) - self.max_per_class
            if over > 0:  # oldest rows out
                merged = {k: v[over:] for k, v in merged.items()}
                self.dropped += over
            buf[int(c)] = merged

    def _emit(self, buf: dict[int, dict[str, torch.Tensor]], candidates: list[int],
              rng: np.random.Generator) -> dict[str, torch.Tensor]:
        chosen = rng.choice(np.asarray(candidates), size=self.p, replace=False)
        parts: list[dict[str, torch.Tensor]] = []
        for c in chosen.tolist():
            rows = buf[c]
            n = _size(rows)
            perm = rng.permutation(n)
            take, keep = perm[: self.k], np.sort(perm[self.k :])
            if n < self.k:  # top-up by repetition within the class
                extra = rng.choice(n, size=self.k - n, replace=True)
                take = np.concatenate([take, extra])
                self.repeated += self.k - n
            device = rows["label"].device
            take_t = torch.as_tensor(take, dtype=torch.long, device=device)
            keep_t = torch.as_tensor(keep, dtype=torch.long, device=device)
            parts.append({k: v[take_t] for k, v in rows.items()})
            buf[c] = {k: v[keep_t] for k, v in rows.items()}
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _size(rows: dict[str, torch.Tensor]) -> int:
    return int(rows["label"].shape[0])
