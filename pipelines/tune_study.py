"""Hyper-parameter studies: Ray Tune + Optuna over the two-stage job (``ltcore-tune``): see :mod:`ltcore.entry.tune`.

    python pipelines/tune_study.py --config ltcore/configs/study_demo.yaml
"""

from ltcore.entry.tune import run

if __name__ == "__main__":
    run()
