"""Batch prediction with a registered model (default: the champion) over images in any storage, on Ray Data.

    python pipelines/predict.py --config ltcore/configs/retrain_demo.yaml --images s3://bucket/new/ --out s3://bucket/pred/
    python pipelines/predict.py --config ... --images s3://bucket/new/labels.csv --id-column image_id \
        --path-template {id}.jpg --model 3 --out ./pred

``--images``: a folder (every image file under it) or a CSV/Parquet table. ``--model``: a version number or an alias
of the config's registered model (``tracking.model_name``, default ``data.name``); default ``retrain.alias``.
Writes ``<out>/predictions.parquet``: id, uri, predicted_class, prob_<class> per class, model, model_version, error
(unreadable images are error rows). Progress lines; the last line is ``predictions: <URI>``.
"""

from __future__ import annotations

from ltcore import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder URI, or a CSV/Parquet table URI")
    p.add_argument("--out", required=True, help="output folder URI (predictions.parquet goes there)")
    p.add_argument("--model", default=None, help="version number or alias (default: retrain.alias, 'champion')")
    p.add_argument("--id-column", default="image_id", help="table input: the id column")
    p.add_argument("--path-template", default="{id}", help="table input: image path under the table's folder")
    p.add_argument("--actors", type=int, default=0, help="actor pool size (default: GPUs, else 2)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_intermixed_args(argv)  # overrides before and after a flag
    if args.actors < 0 or args.batch_size < 1 or args.cpus_per_actor <= 0:
        raise ValueError("--actors must be >= 0, --batch-size >= 1, --cpus-per-actor > 0")
    cfg = cli.load(args.config, args.overrides)

    from ltcore import storage
    from ltcore.lifecycle import predict

    s3 = storage.S3Options(cfg.storage.s3_endpoint_url, cfg.storage.s3_access_key, cfg.storage.s3_secret_key,
                           cfg.storage.s3_region)
    storage.set_default_s3(s3)
    # Everything that can fail on bad input, before Ray starts: output, images, model.
    out_uri = predict.check_output(storage.normalize(args.out))
    rows = predict.list_images(storage.normalize(args.images), id_column=args.id_column,
                               path_template=args.path_template)
    spec, state, meta = predict.load_version(cfg, args.model or cfg.retrain.alias)
    print(f"predict: {len(rows)} images from {args.images} with {spec.name} version {spec.version}", flush=True)

    cli.init_ray()
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = args.actors or (gpus or 2)
    predict.run_prediction(rows, spec, state, meta, out_uri, actors=actors, cpus_per_actor=args.cpus_per_actor,
                           gpus_per_actor=1.0 if gpus else 0.0, batch_size=args.batch_size, s3=s3)
    print(f"predictions: {out_uri}", flush=True)
    return 0


def run() -> None:
    """Console script ``ltcore-predict``."""
    cli.run_main(main)
