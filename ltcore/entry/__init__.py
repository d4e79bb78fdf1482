"""The entry points: ``main(argv)`` of each command, run by the console scripts (``ltcore-prepare``,
``ltcore-train``, ``ltcore-evaluate``) and by the ``pipelines/*.py`` scripts, which only call them."""
