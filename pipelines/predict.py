"""Batch prediction with a registered model on Ray Data (``ltcore-predict``): see :mod:`ltcore.entry.predict`."""

from ltcore.entry.predict import run

if __name__ == "__main__":
    run()
