"""What every entry point shares: argument parsing, config loading, Ray start-up, one-line errors.

The entry points (:mod:`ltcore.entry`, run by the console scripts and by ``pipelines/*.py``) stay thin: parse,
load config, start Ray, call one library function. The shipped configs are package data (``ltcore/configs``), so
an installed package (not only a source checkout) finds the demo config.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ltcore import storage
from ltcore.config import Config, ConfigError, load_config
from ltcore.raystart import init_ray as init_ray  # re-exported: the entry scripts start Ray through cli

# The shipped configs: demo.yaml (the default of ltcore-train) and one HAM10000 config per method.
CONFIG_DIR = str(importlib.resources.files("ltcore") / "configs")
DEMO_CONFIG = os.path.join(CONFIG_DIR, "demo.yaml")

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


def parser(description: str, *, config: bool = True) -> argparse.ArgumentParser:
    """The entry scripts' parser: ``--config FILE`` and ``section.key=value`` overrides (``config=False``: a script
    that reads no config adds its own arguments only)."""
    p = argparse.ArgumentParser(description=description)
    if config:
        p.add_argument("--config", default=None, help="YAML config file (path or URI)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. stage1.epochs=5")
    return p


def load(path: str | None, overrides: Sequence[str], smoke: bool = False) -> Any:
    extra = list(SMOKE_OVERRIDES) if smoke else []
    return load_config(path, extra + list(overrides))


def use_storage(cfg: Config) -> None:
    """Make the config's S3 endpoint and credentials the process-wide default for every URI read or written."""
    st = cfg.storage
    storage.set_default_s3(storage.S3Options(endpoint_url=st.s3_endpoint_url, access_key=st.s3_access_key,
                                             secret_key=st.s3_secret_key, region=st.s3_region))


def run_main(fn: Callable[[], int | None]) -> None:
    """Run an entry point; expected errors become one line on stderr and exit code 2, no traceback."""
    from ltcore import logs
    from ltcore.engine.runs import RunError

    logs.setup()
    try:
        code = fn()
    except (ConfigError, storage.StorageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:  # failed while training: one line, the traceback is in the run's error.log
        _stop_ray()  # Ray forwards workers' logs asynchronously: let them out first, so that the line is the last
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if e.bad_input else 1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):  # the error line matters more than a clean shutdown
            ray.shutdown()
