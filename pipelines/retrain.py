"""Scheduled retraining behind a tail-aware gate (``ltcore-retrain``): see :mod:`ltcore.entry.retrain`."""

from ltcore.entry.retrain import run

if __name__ == "__main__":
    run()
