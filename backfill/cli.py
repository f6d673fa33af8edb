"""The `backfill` command: make sample data, register models, search, and see what is published."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from backfill.errors import BackfillError, ConfigError
from backfill.settings import setting

if TYPE_CHECKING:
    from backfill.plan import Startup


def _layout(root: str):
    from backfill.storage import Layout, Store

    return Layout(Store.open(root))


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None)


def cmd_sample(args: argparse.Namespace) -> None:
    from backfill.sample import SampleSpec, make_sample_corpus

    spec = SampleSpec(images=args.images, shards=args.shards, seed=args.seed)
    with _bar(spec.images, "sample corpus") as bar:
        result = make_sample_corpus(_layout(args.root), spec, progress=bar.update)
    print(
        f"wrote {result['images']} images in {result['groups']} near-duplicate groups, "
        f"{result['shards']} manifest shards"
    )


def cmd_register(args: argparse.Namespace) -> None:
    from backfill.registry import register_version

    if args.artifact:
        blob, fmt = _read_artifact(args.artifact)
        if not args.dim or not args.input_size:
            raise BackfillError("--artifact needs --dim and --input-size (what model.json will promise)")
        dim, preprocess = args.dim, _preprocess_flags(args)
    else:
        if _preprocess_flag_names(args):
            raise BackfillError(
                f"{', '.join(_preprocess_flag_names(args))} go with --artifact; a reference model declares its own"
            )
        blob, dim, preprocess = _reference(args)
        fmt = "torch.export"
    extra = {"precision": args.precision} if args.precision != "fp32" else None
    card = register_version(
        _layout(args.root), args.model, args.version, blob, dim=dim, preprocess=preprocess, format=fmt, extra=extra
    )
    print(
        f"registered {card.name} {card.version}: dim={card.dim} input={card.input_size} "
        f"precision={card.precision} format={card.format} preprocessing={card.preprocess.describe()} "
        f"sha256={card.sha256[:12]}…"
    )


PREPROCESS_FLAGS = ("resize", "resize_size", "interpolation", "mean", "std", "channels")


def _preprocess_flag_names(args: argparse.Namespace) -> list[str]:
    return ["--" + f.replace("_", "-") for f in PREPROCESS_FLAGS if getattr(args, f) is not None]


def _preprocess_flags(args: argparse.Namespace):
    """The contract an --artifact declares; unset flags keep the defaults (squash, bilinear, 0.5/0.5, RGB)."""
    from backfill.preprocess import Preprocess

    given = {f: getattr(args, f) for f in PREPROCESS_FLAGS if getattr(args, f) is not None}
    for key in ("mean", "std"):
        if key in given:
            given[key] = _three_numbers(f"--{key}", given[key])
    return Preprocess(args.input_size, **given)


def _three_numbers(flag: str, text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise BackfillError(f"{flag} takes three comma-separated numbers (e.g. 0.485,0.456,0.406), got {text!r}")
    return values  # type: ignore[return-value]


def _read_artifact(path: str) -> tuple[bytes, str]:
    """The file's bytes and format; a file that is neither a .pt2 nor a TorchScript archive is refused here."""
    from backfill.registry import artifact_format

    with open(path, "rb") as f:
        blob = f.read()
    fmt = artifact_format(blob)
    if fmt is None:
        raise BackfillError(
            f"--artifact {path}: not a torch.export .pt2 (torch.export.save) nor a TorchScript archive (torch.jit.save)"
        )
    return blob, fmt


def _reference(args: argparse.Namespace):
    """(.pt2 bytes, dim, preprocessing) of a built-in model: refcnn v1/v2, a ResNet, or EfficientNet-Lite0."""
    from backfill.preprocess import Preprocess

    if args.reference == "efficientnet-lite0":
        from backfill.efficientnet import reference_artifact

        return reference_artifact()
    if args.reference:
        from backfill.resnet import export_artifact

        return export_artifact(args.reference), 256, Preprocess(224)
    from backfill.models import REFERENCE, export_artifact

    if args.version not in REFERENCE:
        raise BackfillError(
            f"no reference model {args.version!r} (have {', '.join(REFERENCE)}); pass --artifact to register your own"
        )
    arch = REFERENCE[args.version]
    return export_artifact(arch), arch.dim, Preprocess(arch.input_size)


def cmd_search(args: argparse.Namespace) -> None:
    from backfill.images import BadImage
    from backfill.search import Searcher

    if not 1 <= args.k <= 1000:
        raise BackfillError(f"-k must be in 1..1000, got {args.k}")
    with open(args.image, "rb") as f:
        data = f.read()
    try:
        result = Searcher(_layout(args.root), args.model).search_image(data, k=args.k)
    except BadImage as exc:
        raise BackfillError(f"query {args.image}: {exc}") from None
    if args.json:
        print(
            json.dumps(
                {
                    "model": result.model,
                    "version": result.version,
                    "build_id": result.build_id,
                    "hits": [h.__dict__ for h in result.hits],
                },
                indent=2,
            )
        )
        return
    print(f"{result.model} {result.version} (index {result.build_id}):")
    for rank, hit in enumerate(result.hits, 1):
        print(f"  {rank:2d}. {hit.score:.4f}  id={hit.image_id:<8d} {hit.uri}")


def cmd_serve(args: argparse.Namespace) -> None:
    from backfill.pipeline import ThreadBudget
    from backfill.search import Searcher
    from backfill.service import ServiceConfig, serve

    config = ServiceConfig(
        max_upload_bytes=args.max_upload_bytes,
        max_k=args.max_k,
        poll_s=args.poll_s,
        max_in_flight=args.max_in_flight,
        max_queued=args.max_queued,
        queue_wait_s=args.queue_wait_s,
        request_timeout_s=args.request_timeout_s,
        token=setting("BACKFILL_SERVICE_TOKEN"),  # from the environment only: a flag would show in `ps`
    )
    # torch (query embedding) and FAISS threads follow the pod's CPU limit, not the node's core count
    ThreadBudget.resolve().apply()
    serve(Searcher(_layout(args.root), args.model), args.host, args.port, config)


def cmd_retire(args: argparse.Namespace) -> None:
    from backfill.retire import plan_retirement, retire

    layout = _layout(args.root)
    plan = plan_retirement(layout, args.model, args.keep)
    print(plan.describe())
    if not plan.retire and not plan.builds:
        return
    if not args.yes:
        print("dry run: nothing was removed; run again with --yes to carry it out")
        return
    retire(layout, plan)
    print(
        f"retired {', '.join(plan.retire) or 'no version'} and deleted {len(plan.builds)} index builds; "
        "the registry sensor deletes their model_version partitions on its next tick"
    )


def cmd_status(args: argparse.Namespace) -> None:
    from backfill.publish import read_pointer
    from backfill.registry import list_versions

    layout = _layout(args.root)
    if args.version:
        _backfill_status(layout, args.model, args.version)
        return
    cards, skipped = list_versions(layout, args.model)
    print(f"registry {args.model}: {', '.join(c.version for c in cards) or 'no versions'}")
    for version, reason in skipped.items():
        print(f"  skipped {version}: {reason}")
    for model in layout.indexed_models() or [args.model]:
        pointer = read_pointer(layout, model)
        if pointer is None:
            print(f"{model}: nothing published")
        else:
            print(
                f"{model}: serving {pointer['version']} build {pointer['build_id']} ({pointer['index_type']}, "
                f"{pointer['vectors']} vectors, nprobe={pointer['nprobe']}, "
                f"recall@{pointer['k']}={pointer['recall_at_k']}, "
                f"published {pointer['published_at']})"
            )


def _backfill_status(layout, model: str, version: str) -> None:
    """A version's backfill: storage says what is committed; the Dagster instance, when there is one, what runs."""
    import time

    from backfill.calibrate import shard_rows
    from backfill.status import describe, progress

    runs, source = _dagster_runs(version)
    now = time.time()
    print(describe(progress(layout, model, version, shard_rows(layout), runs, now), now))
    print(f"  ({source})")


def _dagster_runs(version: str):
    """(the version's runs, where they came from); (None, why) without a Dagster instance to read."""
    from ops.runs import embedding_runs

    instance, why = _dagster_instance()
    if instance is None:
        return None, f"from storage only ({why}); set DAGSTER_HOME to see which shards are running"
    with instance:
        return embedding_runs(instance, version), f"runs from the Dagster instance in {instance.root_directory}"


def _dagster_instance():
    """(the DAGSTER_HOME instance, "") or (None, why): the Dagster side is optional here, read when it can be."""
    from dagster import DagsterError, DagsterInstance

    try:
        return DagsterInstance.get(), ""
    except DagsterError as exc:  # DAGSTER_HOME unset (DagsterHomeNotSetError) or its dagster.yaml unreadable
        return None, str(exc).strip().splitlines()[0]


def cmd_plan(args: argparse.Namespace) -> None:
    from backfill.calibrate import calibration_rows, calibration_summary, plan_version
    from backfill.plan import plan_rows, plan_summary
    from backfill.report import write_plan
    from backfill.settings import Settings

    settings = Settings.from_env()
    layout = _layout(args.root)
    pod, pods, device, index_threads = _plan_pool(args, settings)
    startup = None if args.pool else _local_startup(pods, args.startup_s)
    if args.img_s is None:
        print(f"plan: calibrating {args.model} {args.version} on {args.images} sample images ({device})",
              file=sys.stderr, flush=True)  # fmt: skip
    plan, calibration = plan_version(
        layout, args.model, args.version, _replace(settings.embed, device=device), settings.index, pod, pods,
        args.images, img_s=args.img_s, index_threads=index_threads, startup=startup,
    )  # fmt: skip
    extra = calibration_summary(calibration) if calibration else {}
    where = write_plan(layout, args.model, args.version, plan_summary(plan, **extra))
    rows = (calibration_rows(calibration) if calibration else []) + plan_rows(plan)
    print(f"plan for {args.model} {args.version}:")
    for what, value in rows:
        print(f"  {what + ':':24} {value}")
    print(f"saved to {where} (the backfill_report asset puts it beside the actuals)")


def _replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def _plan_pool(args: argparse.Namespace, settings):
    """(pod spec or None for local, pods, device, index threads) for --pool / --pods."""
    from backfill.pipeline import cpu_budget

    if not args.pool:
        return None, args.pods or _local_slots(), settings.embed.device, cpu_budget()
    from ops.pools import load_pools, pod_spec  # the pools file is the deployment's: read through ops

    pools = load_pools(settings.pools_file)
    pool = pools.get(args.pool)
    index = pools.get(pools.index_pool) if pools.index_pool else pool
    return pod_spec(pool), args.pods or pool.max_concurrent_runs, pool.device, int(index.cpus)


def _local_startup(slots: int, given: float | None) -> Startup:
    """The local default's start-up per partition: `given` (--startup-s), else measured here (ops.startup:
    the DAGSTER_HOME instance's earlier embedding runs, else a probe that launches `slots` runs at once)."""
    from backfill.plan import Startup
    from ops.startup import local_startup

    if given is not None:
        if given < 0:
            raise ConfigError(f"--startup-s {given}: a start-up cannot be negative")
        return Startup(given, "--startup-s")
    instance, _ = _dagster_instance()
    why = "" if instance is None else ": no embedding run on this instance yet"
    probing = f"plan: timing a partition's start-up ({slots} probe runs at once on a scratch instance){why}"
    announce = lambda: print(probing, file=sys.stderr, flush=True)  # noqa: E731
    if instance is None:
        return local_startup(None, slots, announce)
    with instance:
        return local_startup(instance, slots, announce)


def _local_slots() -> int:
    """The local instance's run slots (DAGSTER_HOME's max_concurrent_runs), else the shipped dagster.yaml's 2."""
    from ops.runs import local_slots

    instance, _ = _dagster_instance()
    if instance is None:
        return 2
    with instance:
        return local_slots(instance)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from backfill.evaluate import near_duplicate_recall
    from backfill.manifest import list_shards

    layout = _layout(args.root)
    result = near_duplicate_recall(layout, args.model, args.version, list_shards(layout), k=args.k)
    print(
        f"{args.model} {args.version}: near-duplicate recall@{args.k}={result[f'recall_at_{args.k}']:.4f} "
        f"top1={result['top1']:.4f} over {int(result['queries'])} queries"
    )


def cmd_rejects(args: argparse.Namespace) -> None:
    from collections import Counter

    from backfill.embed import MARKER, read_rejects, reason_kind
    from backfill.manifest import list_shards

    layout = _layout(args.root)
    shards = [args.shard] if args.shard else list_shards(layout)
    reasons: Counter = Counter()
    for shard in shards:
        if not layout.store.exists(f"{layout.embeddings(args.model, args.version, shard)}/{MARKER}"):
            print(f"{shard}: not embedded by {args.version} yet")
            continue
        rows = read_rejects(layout, args.model, args.version, shard).to_pylist()
        for row in rows:
            reasons[reason_kind(row["reason"])] += 1
            if args.list:
                print(f"{shard}\t{row['image_id']}\t{row['uri']}\t{row['reason']}")
    print(f"{args.model} {args.version}: {sum(reasons.values())} rejects in {len(shards)} shards")
    for reason, count in reasons.most_common():
        print(f"  {count:8d}  {reason}")


def cmd_ingest(args: argparse.Namespace) -> None:
    from backfill.ingest import ingest

    def show(result, elapsed_s: float) -> None:
        print(f"ingest: {result.progress_line(elapsed_s)}", file=sys.stderr, flush=True)

    print(f"ingest: listing {args.source} (an s3:// prefix is listed in full first)", file=sys.stderr, flush=True)
    result = ingest(_layout(args.root), args.source, shard_size=args.shard_size, prefix=args.prefix, progress=show)
    print(result.describe())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backfill",
        description="Model backfill platform: re-embed an image corpus for each model version "
        "and publish a FAISS index. "
        "The Dagster UI (`dagster dev` in the repository) runs the backfills; "
        "this command prepares data and queries results.",
        epilog="On S3: credentials come from the standard AWS chain (AWS_* variables, ~/.aws, IAM role); "
        "an S3-compatible store also needs BACKFILL_S3_ENDPOINT_URL=https://host:port.",
    )
    # only the two settings the command uses: a bad BACKFILL_BATCH_SIZE must not stop `backfill status`
    parser.add_argument(
        "--root",
        default=setting("BACKFILL_ROOT"),
        help="data root: a folder or s3://bucket/prefix (env BACKFILL_ROOT; default %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=setting("BACKFILL_MODEL"),
        help="model name in the registry (env BACKFILL_MODEL; default %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "sample", help="generate a synthetic JPEG corpus with near-duplicate groups and its manifest shards"
    )
    p.add_argument("--images", type=int, default=2400)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser(
        "register", help="register a model version (a built-in reference model, or your .pt2 file; docs/models.md)"
    )
    p.add_argument("version", help="version name, e.g. v1; without --artifact, the reference model of that name")
    p.add_argument(
        "--artifact", help="a torch.export .pt2 (or a deprecated TorchScript file) to register instead of a reference"
    )
    p.add_argument("--dim", type=int, help="embedding size the artifact outputs (with --artifact)")
    p.add_argument("--input-size", type=int, help="square input size in pixels (with --artifact)")
    p.add_argument(
        "--reference",
        choices=("resnet18", "resnet50", "efficientnet-lite0"),
        help="a hand-written model: a ResNet (random weights, 256-d at 224 px) or EfficientNet-Lite0 "
        "(ImageNet weights from the .[models] extra, 1280-d)",
    )
    prep = p.add_argument_group("preprocessing the artifact expects (with --artifact; model.json records it)")
    prep.add_argument("--resize", choices=("squash", "resize_crop", "pad"), help="default squash")
    prep.add_argument("--resize-size", type=int, help="resize_crop: shorter side before the crop (default size/0.875)")
    prep.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"), help="default bilinear")
    prep.add_argument("--mean", help="per-channel mean of x/255, e.g. 0.485,0.456,0.406 (default 0.5,0.5,0.5)")
    prep.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225 (default 0.5,0.5,0.5)")
    prep.add_argument("--channels", choices=("RGB", "BGR"), help="channel order the model reads (default RGB)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="autocast precision (bf16/fp16 must match fp32: cosine >= 0.99)",
    )
    p.set_defaults(fn=cmd_register)

    p = sub.add_parser("search", help="find the images nearest to a query image in the published index")
    p.add_argument("image", help="path of the query image")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser(
        "serve", help="HTTP search service over the published index: POST /search, GET /search?image_id=, GET /healthz"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    from backfill.service import ServiceConfig

    served = ServiceConfig()  # the flags' defaults are the service's own
    p.add_argument(
        "--max-upload-bytes",
        type=int,
        default=served.max_upload_bytes,
        help="larger uploads get 413 (default %(default)s)",
    )
    p.add_argument(
        "--max-k", type=int, default=served.max_k, help="largest k a query may ask for (default %(default)s)"
    )
    p.add_argument(
        "--poll-s",
        type=float,
        default=served.poll_s,
        help="seconds between checks of CURRENT for a new build (default %(default)s)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=served.max_in_flight,
        help="searches running at once (default %(default)s: one per CPU of the process's budget)",
    )
    p.add_argument(
        "--max-queued",
        type=int,
        default=served.max_queued,
        help="requests waiting for a search slot; beyond them 503 at once (default %(default)s)",
    )
    p.add_argument(
        "--queue-wait-s",
        type=float,
        default=served.queue_wait_s,
        help="longest wait for a search slot before 503 (default %(default)s)",
    )
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=served.request_timeout_s,
        help="longest upload (then 408) and longest search (then 504) (default %(default)s)",
    )
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser(
        "retire", help="remove versions older than the serving one (embeddings, index builds; their partitions follow)"
    )
    p.add_argument("--keep", type=int, default=1, help="older versions to keep for rollback (default %(default)s)")
    p.add_argument("--yes", action="store_true", help="carry it out; without it, only print what would be removed")
    p.set_defaults(fn=cmd_retire)

    p = sub.add_parser(
        "status",
        help="registered versions and what is published per model; with VERSION, that version's backfill: "
        "shards done/running/left, images committed, img/s and ETA",
    )
    p.add_argument("version", nargs="?", help="a model version: show its backfill's progress")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser(
        "plan",
        help="estimate a version's backfill before launch: calibrate on a corpus sample, then wall time, "
        "pod/GPU-hours, cost, bytes, index (docs/plan.md)",
    )
    p.add_argument("version")
    p.add_argument("--pool", help="a pool of the pools file (default: the local default's run slots)")
    p.add_argument("--pods", type=int, default=0, help="pods (default: the pool's maxConcurrentRuns, or local slots)")
    p.add_argument("--images", type=int, default=256, help="sample images to calibrate on (default %(default)s)")
    p.add_argument("--img-s", type=float, help="one pod's img/s instead of calibrating (a GPU pool from a CPU box)")
    p.add_argument(
        "--startup-s",
        type=float,
        help="a local partition's start-up beyond its compute, instead of measuring it (earlier runs, else a probe)",
    )
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser(
        "rejects", help="images a version could not embed, with the reason (from each shard's rejects table)"
    )
    p.add_argument("version")
    p.add_argument("--shard", help="only this shard")
    p.add_argument("--list", action="store_true", help="one line per rejected image: shard, image_id, uri, reason")
    p.set_defaults(fn=cmd_rejects)

    p = sub.add_parser("evaluate", help="near-duplicate recall@k of a version's embeddings on the sample corpus")
    p.add_argument("version")
    p.add_argument("-k", type=int, default=10)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser(
        "ingest",
        help="write manifest shards for a folder, an s3:// prefix, WebDataset .tar shards, a .txt/.csv/.parquet URI "
        "list or an img2dataset output (only new images; ids never change; docs/ingest.md)",
    )
    p.add_argument(
        "source", help="a folder, s3://bucket/prefix, a .tar, a URI list file, or an img2dataset output folder"
    )
    from backfill.ingest import DEFAULT_SHARD_SIZE

    p.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per new shard (default %(default)s)"
    )
    p.add_argument("--prefix", default="ingest", help="new shards are named PREFIX-NNNNNN (default %(default)s)")
    p.set_defaults(fn=cmd_ingest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (BackfillError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"backfill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
