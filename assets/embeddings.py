"""image_embeddings: one (model version, shard) partition per run, retried on its own."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AutomationCondition,
    Backoff,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

from assets.partitions import embedding_partitions
from assets.resources import BackfillResource, run_engine
from backfill.embed import embed_shard
from backfill.verify import verify_shard

EMBED_RETRY_POLICY = RetryPolicy(max_retries=4, delay=5, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)


@asset(
    partitions_def=embedding_partitions,
    retry_policy=EMBED_RETRY_POLICY,
    # new partitions (a new model version or a new shard) are embedded as one backfill per tick
    automation_condition=AutomationCondition.on_missing(),
    check_specs=[
        AssetCheckSpec("complete", asset="image_embeddings", description="every manifest row committed exactly once"),
        AssetCheckSpec("reject_rate", asset="image_embeddings", description="share of images rejected (warns above warn_reject_rate)"),
    ],
    kinds={"pytorch", "parquet"},
    description="Embeddings of one manifest shard by one model version, in atomically committed chunks.",
)
def image_embeddings(context: AssetExecutionContext, backfill: BackfillResource) -> MaterializeResult:
    keys = context.partition_key.keys_by_dimension
    version, shard = keys["model_version"], keys["shard"]
    layout = backfill.layout()
    model = run_engine(backfill.load_model, version)
    committed = {"rows": 0, "chunks": 0}

    def progress(rows: int) -> None:
        committed["rows"] += rows
        committed["chunks"] += 1
        if committed["chunks"] % 10 == 0:
            context.log.info(f"{shard}: {committed['rows']} rows committed")

    stats = run_engine(embed_shard, layout, shard, model, backfill.embed_config(), progress=progress)
    verdict = run_engine(verify_shard, layout, backfill.model, version, shard)
    reject_rate = stats.rejects / stats.images if stats.images else 0.0
    context.log.info(
        f"{shard} x {version}: {stats.images} images, {stats.rejects} rejects, {stats.chunks_resumed}/{stats.chunks} chunks resumed, "
        f"{stats.images_per_s:.0f} img/s"
    )
    return MaterializeResult(
        metadata={
            "images": stats.images,
            "embedded": stats.embedded,
            "rejects": stats.rejects,
            "reject_reasons": MetadataValue.json(stats.reasons),
            "images_per_s": MetadataValue.float(round(stats.images_per_s, 1)),
            "batch_size": stats.batch_size,
            "device": stats.device,
            "wall_s": MetadataValue.float(round(stats.wall_s, 2)),
            "chunks": stats.chunks,
            "chunks_resumed": stats.chunks_resumed,
            "path": MetadataValue.path(layout.store.display(layout.embeddings(backfill.model, version, shard))),
        },
        check_results=[
            AssetCheckResult(check_name="complete", passed=verdict.ok, metadata={"detail": verdict.detail, "rows": verdict.rows}),
            AssetCheckResult(
                check_name="reject_rate",
                passed=reject_rate <= backfill.warn_reject_rate,
                severity=AssetCheckSeverity.WARN,
                metadata={"reject_rate": round(reject_rate, 5), "warn_above": backfill.warn_reject_rate, "fail_above": backfill.max_reject_rate},
            ),
        ],
    )
