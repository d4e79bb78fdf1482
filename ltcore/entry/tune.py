"""Hyper-parameter study: Ray Tune trials of the two-stage job, Optuna (or a grid) search, ASHA early stopping.

``ltcore-tune``, or ``python pipelines/tune_study.py`` from a checkout:

    ltcore-tune --config ltcore/configs/study_demo.yaml
    ltcore-tune --config ... trials=12 concurrency=1 run.stage1.epochs=6
    ltcore-tune --config ... storage=s3://bucket/studies     # the study's folder on S3

Overrides: study fields (``trials=``, ``storage=``, ``name=``, ...) and, prefixed ``run.``, fields of the run
config every trial starts from. Rerunning the same command resumes an interrupted study (finished trials are not
run again). Prints a line per finished trial, the results table, and last ``study: <results.csv URI>``.
"""

from __future__ import annotations

from ltcore import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    args = p.parse_intermixed_args(argv)  # overrides before and after a flag
    from ltcore.tune.config import load_study

    study, base = load_study(args.config, args.overrides, default_run_config=cli.DEMO_CONFIG)
    cli.use_storage(base)
    from ltcore.tune.study import run_study

    # Ray starts once the study file, the run config and the study folder have been checked.
    uri = run_study(study, base, log=lambda line: print(line, flush=True), start_cluster=cli.init_ray)
    print(f"study: {uri}", flush=True)
    return 0


def run() -> None:
    """Console script ``ltcore-tune``."""
    cli.run_main(main)
