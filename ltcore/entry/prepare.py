"""Prepare a dataset version: raw images + labels -> validated, resized, split Parquet shards + manifest.

    ltcore-prepare --config ltcore/configs/ham10000.yaml [key=value ...]
    python pipelines/prepare_data.py ...                     (the same, from a source checkout)

Overrides are full keys (``data.image_size=128``, ``storage.s3_endpoint_url=...``) or, for the ``data``
section, bare keys (``image_size=128``). Without ``--config``: the embedded digits. Paths in configs and
overrides are resolved relative to the current directory. Joins the Ray cluster in ``RAY_ADDRESS`` or starts a
local Ray, and only when there is work to do. The last line printed is ``dataset: <manifest URI>``. Bad config
or input: ``error: <message>``, exit status 2.
"""

from __future__ import annotations

import dataclasses

from ltcore import cli
from ltcore.config import Config, DataConfig

_DATA_KEYS = {f.name for f in dataclasses.fields(DataConfig)}
_TOP_KEYS = {f.name for f in dataclasses.fields(Config)}


def qualify(overrides: list[str]) -> list[str]:
    """Prefix ``data.`` to overrides whose first key is a data field and not a top-level section."""
    out = []
    for item in overrides:
        first = item.split("=", 1)[0].strip().split(".", 1)[0]
        out.append(f"data.{item.strip()}" if first in _DATA_KEYS and first not in _TOP_KEYS else item)
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--quiet", action="store_true", help="print only the result line")
    args = p.parse_intermixed_args(argv)  # overrides before and after a flag
    cfg: Config = cli.load(args.config, qualify(args.overrides))
    cli.use_storage(cfg)

    from ltcore.data.prepare import prepare_dataset

    uri, _ = prepare_dataset(cfg.data, progress=not args.quiet)
    print(f"dataset: {uri}", flush=True)
    return 0


def run() -> None:
    """Console script ``ltcore-prepare``."""
    cli.run_main(main)
