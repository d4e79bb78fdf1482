"""Worker-side helpers that need no Ray: rate-limited progress lines, rank-0 logging."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture()
def lines() -> list[str]:
    """The messages ltcore's engine logs during the test."""
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    logger = logging.getLogger("ltcore.engine")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_progress_lines_are_rate_limited(lines, monkeypatch):
    from ltcore.engine import worker

    clock = iter([0.0, 10.0, 30.0, 70.0, 71.0, 200.0, 400.0])
    monkeypatch.setattr(worker.time, "perf_counter", lambda: next(clock))
    p = worker.Progress("[stage1] epoch 1/2", every_s=60.0)  # starts at t=0
    for _ in range(4):  # t = 10, 30, 70, 71
        p.step(64, 2.0)
    # one line: at t=70 (the first step 60 s or more after the start), none at 71; 192 images / 70 s = 2.7 img/s
    assert lines == ["[stage1] epoch 1/2 step 3: 192 images on this worker, 3 img/s, mean loss 2.0000"]
    off = worker.Progress("[stage1] epoch 1/2", every_s=0.0)  # t = 200
    off.step(64, 1.0)
    assert len(lines) == 1


def test_setup_logging_adds_one_handler():
    from ltcore import logs

    logs.setup()
    logs.setup()  # idempotent: a second call adds no second handler (each line would print twice)
    root = logging.getLogger("ltcore")
    assert sum(getattr(h, "_ltcore", False) for h in root.handlers) == 1
    assert root.level == logging.INFO and root.propagate is False


def test_phase_timer_splits_data_wait_from_the_step():
    import time

    import numpy as np
    import torch

    from ltcore.engine.worker import PhaseTimer

    def slow_batches(n):  # blocks 0.05 s in every next(), like a starved input pipeline
        for i in range(n):
            time.sleep(0.05)
            yield {"image": np.zeros((2, 3, 4, 4), np.uint8), "label": np.array([i, i])}

    timer = PhaseTimer()
    seen = []
    for batch in timer.batches(slow_batches(3), torch.device("cpu")):
        seen.append(batch["image"].dtype)  # moved and normalised: uint8 -> float32, as to_device does
        with timer.phase("forward_backward"):
            time.sleep(0.2)  # the step: must not be counted as data wait (the generator is suspended)
        with timer.phase("optimizer"):
            pass
    assert seen == [torch.float32] * 3
    s = timer.seconds
    # 3 x 0.05 s of waiting; had the 3 x 0.2 s steps been counted too it would be >= 0.75 s
    assert 0.15 <= s["data_wait"] < 0.15 + 0.25
    assert s["forward_backward"] >= 0.6
    assert s["optimizer"] < 0.05  # an empty phase costs ~microseconds


def test_phase_timer_adds_repeated_phases():
    from ltcore.engine.worker import PhaseTimer

    timer = PhaseTimer()
    timer.add("optimizer", 0.25)
    timer.add("optimizer", 0.5)
    with timer.phase("val"):
        pass
    assert timer.seconds["optimizer"] == 0.75 and 0.0 <= timer.seconds["val"] < 0.05
