"""ltcore's own log lines: one per event, to stdout, without prefixes; Ray's core and Train messages at warning.

The entry scripts call :func:`setup` once; Ray Train workers call it at start-up (``engine.worker``), and only
the first worker logs, so a line is printed once however many workers run. ``LTCORE_RAY_LOG_LEVEL`` (default
``WARNING``) is the level of Ray's core and Ray Train messages (``INFO`` brings them back).
"""

from __future__ import annotations

import logging
import os
import sys

RAY_LOG_LEVEL_ENV = "LTCORE_RAY_LOG_LEVEL"


def setup(level: int = logging.INFO) -> None:
    """Send the ``ltcore`` loggers' records to stdout as bare messages; idempotent."""
    root = logging.getLogger("ltcore")
    if not any(getattr(h, "_ltcore", False) for h in root.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._ltcore = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # Ray's root-logger handlers in workers would print each line a second time


def ray_log_level() -> str:
    """The level for Ray's own loggers: ``LTCORE_RAY_LOG_LEVEL`` or WARNING."""
    level = os.environ.get(RAY_LOG_LEVEL_ENV, "WARNING").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"{RAY_LOG_LEVEL_ENV}={level!r} is not a logging level; use DEBUG, INFO, WARNING or ERROR")
    return level


class _Stdout(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is at the time of each record (a redirect made later still gets it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stdout

    @stream.setter
    def stream(self, value: object) -> None:  # set by StreamHandler.__init__; the property reads sys.stdout
        pass
