"""Evaluate a saved model (any stage checkpoint) on a split of any dataset version.

    ltcore-evaluate --model <checkpoint URI> --dataset <manifest URI> [--split test] [--out DIR]
    python pipelines/evaluate.py ...                          (the same, from a source checkout)

Prints the metrics table; the last line is ``report: <report.json URI>``.
"""

from __future__ import annotations

from ltcore import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0], config=False)
    p.add_argument("--model", required=True, help="checkpoint directory URI (the report's `model` field)")
    p.add_argument("--dataset", required=True, help="manifest.json URI of a dataset version")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default=None, help="where report.json goes (default: <model>/eval-<split>)")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)

    from ltcore.engine.evaluate import evaluate_checkpoint

    uri = evaluate_checkpoint(args.model, args.dataset, args.split, out_uri=args.out, batch_size=args.batch_size)
    print(f"report: {uri}", flush=True)
    return 0


def run() -> None:
    """Console script ``ltcore-evaluate``."""
    cli.run_main(main)
