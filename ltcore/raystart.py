"""Ray start-up: join the cluster in ``RAY_ADDRESS`` or start a local Ray.

Below the entry layer so that library code that needs a cluster only when it has work for one (``prepare``
after its up-to-date check) can start it without importing the entry scripts' module (:mod:`ltcore.cli`).
Ray is imported inside the function: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any


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
        # Every worker process of a local Ray holds Ray's INFO lines to the same level (quiet_worker).
        start_local(num_cpus=num_cpus, runtime_env={"worker_process_setup_hook": "ltcore.raystart.quiet_worker"},
                    **quiet)
    logging.getLogger("ray").setLevel(level)
    quiet_ray_loggers(level)
    # Ray Data's progress bars and its per-execution "Starting execution ... Execution plan ..." lines only on a
    # terminal (every epoch is an execution; Ray workers would otherwise write them into the driver's log).
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = sys.stderr.isatty()


# A local Ray's processes must find their own cluster when they look one up without an address: Ray Train's
# placement-group cleaner asks the state API whether the run's controller is alive, and with no address the state
# API asks the cluster that `ray start` recorded last in <temp>/ray/ray_current_cluster. Another Ray head on the
# same machine (a `ray start` cluster, a test's) answers "no such actor", and the cleaner removes the live run's
# placement group, killing its workers. So a local Ray gets a temp root of its own (RAY_TMPDIR, inherited by every
# process it starts), in which its own address is recorded.


def start_local(**init_kwargs: Any) -> None:
    """``ray.init(address="local", ...)`` in a temp root of its own, with its address recorded there."""
    import ray

    root = _private_temp_root()
    ray.init(address="local", _temp_dir=os.path.join(root, "ray"), **init_kwargs)
    _record_address(root, ray.get_runtime_context().gcs_address)


def _private_temp_root() -> str:
    # Short and under /tmp: Ray's Unix socket paths live below it (about 107 characters at most).
    root = tempfile.mkdtemp(prefix="ltray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.environ["RAY_TMPDIR"] = root  # before ray.init: the processes it starts inherit it
    return root


def _record_address(temp_root: str, gcs_address: str) -> None:
    path = os.path.join(temp_root, "ray", "ray_current_cluster")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(gcs_address)


def quiet_ray_loggers(level: str) -> None:
    """Ray's lines that the levels set above miss, held at ``level`` in this process:

    - Ray Train 2.60 logs every report ("Reporting training result N: TrainingReport(...)", from each worker) through
      a logger named by its file path, outside ``ray.train``, so the run config's ``LoggingConfig`` level misses it;
    - Ray Data's executor logs "Dataset ... execution finished" at INFO through its own ``ray.data`` handlers, and
      each process that runs an execution warns once that progress bars are off (ltcore turns them off where there
      is no terminal); at the default level that warning is held back too.

    Called by the driver, each Tune trial and each Train worker, and, on a local Ray, by every worker process
    (:func:`quiet_worker`); Ray Data's log file keeps everything.
    """
    import logging

    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(level)
    numeric = logging.getLevelName(level)
    logging.getLogger("ray.data._internal.progress").setLevel(max(numeric, logging.ERROR)
                                                              if numeric >= logging.WARNING else numeric)
    with contextlib.suppress(ImportError):  # another Ray Train layout: nothing to hold
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(level)


def quiet_worker() -> None:
    """``worker_process_setup_hook`` of a local Ray: :func:`quiet_ray_loggers` in every worker process, and Ray
    Train's own use of a deprecated Ray Data option (``ExecutionOptions.exclude_resources``) not warned about."""
    import warnings

    from ltcore import logs

    quiet_ray_loggers(logs.ray_log_level())
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources.*")
