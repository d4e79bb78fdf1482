"""What every entry script shares: argument parsing, Ray start-up, one-line errors.

Entry scripts in ``pipelines/`` stay thin: parse, load config, start Ray, call one library function.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ltcore.config import ConfigError, load_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO_ROOT, "pipelines", "configs", "demo.yaml")

# A smoke test runs any config tiny: one short epoch per stage on a few hundred images.
SMOKE_OVERRIDES = (
    "stage1.epochs=1",
    "stage2.epochs=1",
    "train.max_steps_per_epoch=2",
    "data.limit=300",
    "stage1.batch_size=16",
    "stage2.batch_size=16",
    "train.eval_batch_size=64",
)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML config file (path or URI)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. stage1.epochs=5")
    return p


def load(path: str | None, overrides: Sequence[str], smoke: bool = False) -> Any:
    extra = list(SMOKE_OVERRIDES) if smoke else []
    return load_config(path, extra + list(overrides))


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard's state API is what Ray Train's placement-group cleaner polls; keep it on.
        # address="local": a fresh local Ray, never a stale one left by `ray start` (set RAY_ADDRESS for that).
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def run_main(fn: Callable[[], int | None]) -> None:
    """Run an entry point; expected errors become one line on stderr and exit code 2, no traceback."""
    from ltcore.engine.runs import RunError
    from ltcore.storage import StorageError

    try:
        code = fn()
    except (ConfigError, StorageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:  # failed while training: one line, the traceback is in the run's error.log
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if e.bad_input else 1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)
