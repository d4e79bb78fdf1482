"""Evaluate a saved model on a split of a dataset version (``ltcore-evaluate``): see :mod:`ltcore.entry.evaluate`.

    python pipelines/evaluate.py --model <checkpoint URI> --dataset <manifest URI> [--split test] [--out DIR]
"""

from ltcore.entry.evaluate import run

if __name__ == "__main__":
    run()
