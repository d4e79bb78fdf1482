"""The rank helpers, for the engine: one copy, in :mod:`ltcore.dist` (pure torch), which the core's recipes use
too; the engine keeps importing them from here."""

from __future__ import annotations

from ltcore.dist import (
    all_gather_object,
    all_reduce_sum,
    gather_arrays,
    gather_rows,
    is_dist,
    is_main,
    rank,
    world_size,
)

__all__ = ["all_gather_object", "all_reduce_sum", "gather_arrays", "gather_rows", "is_dist", "is_main", "rank",
           "world_size"]
