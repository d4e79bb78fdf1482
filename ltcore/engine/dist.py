"""Rank helpers that work the same with and without torch.distributed (detectron2 style: 0 and 1 alone)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist


def is_dist() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        torch_dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def gather_arrays(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Concatenate per-rank arrays (different lengths allowed) across ranks, on every rank.

    Metrics are computed once on the gathered predictions, never averaged across ranks.
    """
    parts = all_gather_object(tuple(arrays))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    if not is_dist():
        return values
    t = torch.as_tensor(values, dtype=torch.float64)
    torch_dist.all_reduce(t)
    return t.numpy()
