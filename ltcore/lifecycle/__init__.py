"""Model lifecycle on MLflow: tracking of two-stage runs, the model registry with a ``champion`` alias, the retrain
gate, and batch prediction with the champion.

- :mod:`ltcore.lifecycle.tracking`: MLflow client for a config (embedded SQLite store or a server), logging a
  finished two-stage run (params, metrics, report, plots, checkpoint).
- :mod:`ltcore.lifecycle.registry`: model versions, the champion alias (compare-and-set), the retrain lock.
- :mod:`ltcore.lifecycle.gate`: the tail-aware promotion rule (pure).
- :mod:`ltcore.lifecycle.retrain`: the scheduled retrain job.
- :mod:`ltcore.lifecycle.predict`: batch prediction on Ray Data.
"""
