"""Data: sources (label tables, ImageFolder, embedded digits), splits, dataset versions, the prepare job, ingest.

Importing this package imports nothing heavy: Ray is only imported by ``ltcore.data.prepare`` and
``ltcore.data.ingest``, the two modules that run on Ray Data.
"""
