"""Hyper-parameter studies: Ray Tune trials that each run the two-stage job, searched by Optuna or a grid.

``config`` (the study file and its checks) and ``space`` (distributions) import no Ray; ``trial``, ``study`` and
``tracking`` are the Ray Tune side; ``results`` writes the table, the best config and the plots.
"""
