"""Scheduled retraining behind a tail-aware gate: newest data -> two-stage job -> model version -> champion alias.

    python pipelines/retrain.py --config ltcore/configs/retrain_demo.yaml [key=value ...]
    ray job submit --working-dir . -- python pipelines/retrain.py --config ltcore/configs/retrain_ham10000.yaml

Prepares the newest data (extending the champion's dataset version: its test images stay test); if neither the
data nor the training config changed since the champion, says so and stops; otherwise trains, registers the model
in MLflow's model registry, evaluates challenger and champion on the same test split and moves the alias
(``retrain.alias``, default ``champion``) only if balanced accuracy and few-shot accuracy are no worse than the
champion's minus ``retrain.tolerance_*``. Registry: ``tracking.mlflow_uri`` (default: SQLite at
``<train.storage>/mlflow.db``).

Last line and exit status: ``promoted: ...`` (0), ``nothing to do: ...`` (0), ``kept champion: ...`` (3),
``error: ...`` (1 failed; 2 bad input, before any cluster work).
"""

from __future__ import annotations

from ltcore import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--smoke-test", action="store_true", help="run the config tiny (1 short epoch per stage)")
    args = p.parse_intermixed_args(argv)  # overrides before and after a flag
    cfg = cli.load(args.config, args.overrides, smoke=args.smoke_test)

    from ltcore.lifecycle.retrain import retrain

    cli.use_storage(cfg)
    result = retrain(cfg, start_cluster=cli.init_ray)
    print(result.last_line, flush=True)
    return result.exit_code


def run() -> None:
    """Console script ``ltcore-retrain``."""
    cli.run_main(main)
