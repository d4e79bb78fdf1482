"""Prepare a dataset version (``ltcore-prepare``): see :mod:`ltcore.entry.prepare`.

    python pipelines/prepare_data.py --config ltcore/configs/ham10000.yaml [key=value ...]
"""

from ltcore.entry.prepare import run

if __name__ == "__main__":
    run()
