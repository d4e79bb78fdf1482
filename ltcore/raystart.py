"""Ray start-up: join the cluster in ``RAY_ADDRESS`` or start a local Ray.

Below the entry layer so that library code that needs a cluster only when it has work for one (``prepare``
after its up-to-date check) can start it without importing the entry scripts' module (:mod:`ltcore.cli`).
Ray is imported inside the function: importing this module costs nothing.
"""

from __future__ import annotations

import os
import sys


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local Ray; no-op when Ray
    is already initialised in this process."""
    import logging

    import ray

    from ltcore import logs

    if ray.is_initialized():
        return
    level = logs.ray_log_level()
    # Ray's own messages (driver and every Ray process) at warning level unless asked for: ltcore's progress
    # lines and the metrics table are what a run prints.
    quiet = {"log_to_driver": True, "logging_level": getattr(logging, level),
             "logging_config": ray.LoggingConfig(encoding="TEXT", log_level=level)}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
    else:
        # The dashboard's state API is what Ray Train's placement-group cleaner polls; keep it on.
        # address="local": a fresh local Ray, never a stale one left by `ray start` (set RAY_ADDRESS for that).
        ray.init(address="local", num_cpus=num_cpus, **quiet)
    logging.getLogger("ray").setLevel(level)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
