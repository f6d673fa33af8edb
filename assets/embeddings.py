"""image_embeddings: one (model version, shard) partition per run, retried on its own."""

import time
from typing import TYPE_CHECKING

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AutomationCondition,
    Backoff,
    Jitter,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    RetryPolicy,
    RetryRequested,
    asset,
)

from assets.k8s import STEP_K8S_TAGS
from assets.models import model_version
from assets.partitions import embedding_partitions
from assets.resources import BackfillResource, run_engine
from backfill.errors import Preempted
from backfill.preemption import sigterm_notice
from ops.pools import device_for_run

if TYPE_CHECKING:  # torch: the engine is imported by this step's body, not by the definitions (sensors, run workers)
    from backfill.embed import EmbedStats
    from backfill.verify import Verdict

EMBED_RETRY_POLICY = RetryPolicy(max_retries=4, delay=5, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)
# spot capacity can preempt the same shard many times; a preemption is not the shard's fault
PREEMPTION_RETRIES = 20

# AutomationCondition.on_missing() without its `initial_evaluation` reset: on_missing treats
# everything missing at the sensor's first evaluation as already handled, so the partitions of
# a version registered before that first tick (a fresh deployment, a reset cursor) were never
# embedded. Here a partition is requested when it becomes missing, the first evaluation
# included, once; what is already running is never requested again.
EMBED_WHEN_MISSING = (
    AutomationCondition.missing()
    .newly_true()
    .since(AutomationCondition.newly_requested() | AutomationCondition.newly_updated())
    .with_label("missing_since_requested")
    & ~AutomationCondition.in_progress()
    & ~AutomationCondition.any_deps_missing()
).with_label("embed_when_missing")


@asset(
    partitions_def=embedding_partitions,
    # each shard of a version waits for that version's verification (a failed one stays missing)
    deps=[
        AssetDep(
            model_version,
            partition_mapping=MultiToSingleDimensionPartitionMapping(partition_dimension_name="model_version"),
        )
    ],
    retry_policy=EMBED_RETRY_POLICY,
    # new partitions (a new model version or a new shard) are embedded as one backfill per tick
    automation_condition=EMBED_WHEN_MISSING,
    check_specs=[
        # blocking: a shard that fails re-verification from storage holds back what depends on it
        AssetCheckSpec(
            "complete", asset="image_embeddings", blocking=True, description="every manifest row committed exactly once"
        ),
        AssetCheckSpec(
            "reject_rate",
            asset="image_embeddings",
            description="share of images rejected (warns above warn_reject_rate)",
        ),
    ],
    kinds={"pytorch", "parquet"},
    op_tags=STEP_K8S_TAGS,
    description="Embeddings of one manifest shard by one model version, in atomically committed chunks.",
)
def image_embeddings(context: AssetExecutionContext, backfill: BackfillResource) -> MaterializeResult:
    # a MultiPartitionKey from a backfill, a plain "v1|shard-00000" string from a tag or the CLI
    step_started = time.time()
    keys = embedding_partitions.get_partition_key_from_str(str(context.partition_key)).keys_by_dimension
    version, shard = keys["model_version"], keys["shard"]
    layout = backfill.layout()
    # the device follows the run's pool (tag backfill/pool): cuda on GPU pools, never a silent CPU fallback
    device = run_engine(context, device_for_run, context.run.tags, backfill.device)
    load_began = time.perf_counter()
    model = run_engine(context, backfill.load_model, version, device)
    model_load_s = time.perf_counter() - load_began  # the plan swaps it for the planned version's own (ops/runs.py)
    config = backfill.embed_config(device)  # work_log included: the chaos harness's work log, when set
    progress = _progress(context, shard)
    try:
        with sigterm_notice() as stop:
            stats = run_engine(context, embed_shard, layout, shard, model, config, progress=progress, stop=stop)
    except Preempted as exc:
        context.log.warning(f"preempted: {exc}; committed chunks are kept and the retry resumes after them")
        raise RetryRequested(max_retries=PREEMPTION_RETRIES, seconds_to_wait=1) from exc
    verdict = run_engine(context, verify_shard, layout, backfill.model, version, shard)
    context.log.info(
        f"{shard} x {version}: {stats.images} images, {stats.rejects} rejects, "
        f"{stats.chunks_resumed}/{stats.chunks} chunks resumed, {stats.images_per_s:.0f} img/s"
    )
    path = layout.store.display(layout.embeddings(backfill.model, version, shard))
    attempt = {**_attempt_metadata(context, step_started), "model_load_s": round(model_load_s, 3)}
    return _result(stats, verdict, path, backfill, attempt)


def embed_shard(*args, **kwargs) -> "EmbedStats":
    """backfill.embed.embed_shard, imported when the step runs: the definitions load without torch."""
    from backfill.embed import embed_shard as embed

    return embed(*args, **kwargs)


def verify_shard(*args, **kwargs) -> "Verdict":
    """backfill.verify.verify_shard (which reads the chunks through backfill.embed), imported when the step runs."""
    from backfill.verify import verify_shard as verify

    return verify(*args, **kwargs)


def _progress(context: AssetExecutionContext, shard: str):
    """A progress callback that logs every tenth committed chunk."""
    committed = {"rows": 0, "chunks": 0}

    def progress(rows: int) -> None:
        committed["rows"] += rows
        committed["chunks"] += 1
        if committed["chunks"] % 10 == 0:
            context.log.info(f"{shard}: {committed['rows']} rows committed")

    return progress


def _attempt_metadata(context: AssetExecutionContext, step_started: float) -> dict[str, float | int]:
    """Which attempt this is (step retries, run retries) and how long the partition queued before its step ran.

    queue_wait_s: run created (queued by the backfill) -> run started (the daemon dequeued it, its worker
    up); step_wait_s: run started -> this step's body (the step process's start, imports, resources).
    """
    record = context.instance.get_run_record_by_id(context.run.run_id)
    meta: dict[str, float | int] = {
        "attempt": context.retry_number + 1,
        "run_attempt": int(context.run.tags.get("dagster/retry_number", "0")) + 1,
    }
    if record is not None and record.start_time:
        meta["queue_wait_s"] = round(max(0.0, record.start_time - record.create_timestamp.timestamp()), 3)
        meta["step_wait_s"] = round(max(0.0, step_started - record.start_time), 3)
    return meta


def _result(
    stats: "EmbedStats", verdict: "Verdict", path: str, backfill: BackfillResource, attempt: dict[str, float | int]
) -> MaterializeResult:
    """The engine's stats and the re-verification as materialization metadata and check results.

    Every number is a plain numeric entry (the UI plots numeric metadata across partitions): the stage
    seconds as stage_<stage>_s (wait_batch is the model waiting on fetch + decode), the queue waits,
    the attempt numbers.
    """
    reject_rate = stats.rejects / stats.images if stats.images else 0.0
    stages = {f"stage_{k}_s": MetadataValue.float(round(v, 3)) for k, v in sorted(stats.stage_s.items())}
    return MaterializeResult(
        metadata={
            **stages,
            **attempt,
            "embedded_now": stats.images_embedded_now,
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
            "path": MetadataValue.path(path),
        },
        check_results=[
            AssetCheckResult(
                check_name="complete", passed=verdict.ok, metadata={"detail": verdict.detail, "rows": verdict.rows}
            ),
            AssetCheckResult(
                check_name="reject_rate",
                passed=reject_rate <= backfill.warn_reject_rate,
                severity=AssetCheckSeverity.WARN,
                metadata={
                    "reject_rate": round(reject_rate, 5),
                    "warn_above": backfill.warn_reject_rate,
                    "fail_above": backfill.max_reject_rate,
                },
            ),
        ],
    )
