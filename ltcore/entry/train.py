"""Two-stage long-tail training: stage 1 (representation) and stage 2 (calibration) on Ray Train.

    ltcore-train                                              # demo: embedded digits, local Ray, minutes
    ltcore-train --config ltcore/configs/ham10000_ce_crt.yaml
    ltcore-train --config ... --smoke-test stage1.epochs=2
    ray job submit --working-dir . -- python pipelines/two_stage.py --config ...

``python pipelines/two_stage.py`` is the same command from a source checkout. Prints a metrics table per stage;
the last line is ``report: <report.json URI>``.
"""

from __future__ import annotations

from ltcore import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--smoke-test", action="store_true", help="run the config tiny (1 short epoch per stage)")
    args = p.parse_intermixed_args(argv)  # overrides before and after a flag
    cfg = cli.load(args.config or cli.DEMO_CONFIG, args.overrides, smoke=args.smoke_test)

    from ltcore.engine.pipeline import run_two_stage, validate

    cli.use_storage(cfg)
    validate(cfg)  # fail on a bad config before anything is read
    # Ray starts once the run folder, the data and the config have been checked (run_two_stage's order).
    uri = run_two_stage(cfg, start_cluster=cli.init_ray)
    print(f"report: {uri}", flush=True)
    return 0


def run() -> None:
    """Console script ``ltcore-train``."""
    cli.run_main(main)
