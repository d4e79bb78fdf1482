"""ltcore: long-tailed medical image classification on Ray.

The core (losses, sampling, splits, models, methods, eval) imports torch/numpy/scikit-learn only; Ray lives in
``ltcore.engine``, ``ltcore.data.prepare`` and ``ltcore.data.ingest``.
"""

__version__ = "0.1.0"
