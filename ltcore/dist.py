"""Rank helpers that work the same with and without torch.distributed (detectron2 style: 0 and 1 alone).

Pure torch, no Ray: the engine's loops use them for metrics and checkpoints, the stage-1 recipes
(:mod:`ltcore.methods`) to gather features and keys across workers. ``ltcore.engine.dist`` re-exports them.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

__all__ = ["all_gather_object", "all_reduce_sum", "gather_arrays", "gather_rows", "is_dist", "is_main", "rank",
           "world_size"]


def is_dist() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


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


def gather_rows(t: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
    """Concatenate ``t (n_r, ...)`` of every rank along dim 0, in rank order; ``t`` itself when not distributed.

    Ranks may hold different row counts (the last batch of an epoch): sizes are exchanged first and rows are
    padded to the largest count for the collective, then trimmed. With ``differentiable=True`` the gather is
    autograd-aware (``torch.distributed.nn``): its backward sums, over ranks, the gradient each rank's loss sends
    to this rank's rows, so a loss computed identically on every rank from the gathered rows, followed by DDP's
    gradient averaging, yields exactly the gradient of that global loss. Otherwise the result is detached.
    """
    world = world_size()
    if world == 1:
        return t if differentiable else t.detach()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes_t = [torch.zeros_like(n) for _ in range(world)]
    torch_dist.all_gather(sizes_t, n)
    sizes = [int(s) for s in sizes_t]
    pad = max(sizes) - t.shape[0]
    padded = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
    if differentiable:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a private API; still correct
            parts = list(all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch_dist.all_gather(parts, padded.detach().contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])
