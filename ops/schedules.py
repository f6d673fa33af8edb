"""A periodic refresh (reconciliation) of the serving version's embeddings (off by default)."""

from collections.abc import Mapping

from dagster import (
    DagsterInvalidDefinitionError,
    DefaultScheduleStatus,
    MultiPartitionKey,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
)

from assets.embeddings import image_embeddings
from assets.partitions import shards
from assets.resources import BackfillResource
from backfill.errors import ConfigError
from backfill.publish import read_pointer
from backfill.settings import Settings

embed_job = define_asset_job("embed_job", selection=[image_embeddings])


def refresh_schedule_for(
    cron: str = Settings().refresh_cron, pool_tags: Mapping[str, str] | None = None
) -> ScheduleDefinition:
    """The refresh schedule on `cron` (BACKFILL_REFRESH_CRON), its runs tagged with `pool_tags` (BACKFILL_POOL)."""
    tags = dict(pool_tags or {})

    def refresh(context: ScheduleEvaluationContext, backfill: BackfillResource):
        pointer = read_pointer(backfill.layout(), backfill.model)
        if pointer is None:
            return SkipReason(f"nothing is published for {backfill.model} yet: nothing to refresh")
        version = pointer["version"]
        tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
        return [
            RunRequest(
                run_key=f"refresh-{version}-{shard}-{tick}",
                partition_key=MultiPartitionKey({"model_version": version, "shard": shard}),
                tags={"backfill/refresh": tick, **tags},
            )
            for shard in context.instance.get_dynamic_partitions(shards.name)
        ]

    try:
        return schedule(
            name="refresh_schedule",
            cron_schedule=cron,
            job=embed_job,
            default_status=DefaultScheduleStatus.STOPPED,
            description="Re-runs every shard partition of the serving model version: a shard whose completion marker "
            "is in storage is verified and kept (the model is deterministic, so embedding it again would write the "
            "same vectors), a shard that is missing or incomplete (lost data, a failed partition) is embedded; then "
            "faiss_index and search_index rebuild and republish. Dagster 1.13 schedules cannot launch a backfill, so "
            "this launches one run per shard.",
        )(refresh)
    except DagsterInvalidDefinitionError as exc:  # Dagster's own check of the cron string
        raise ConfigError(
            f"environment variable BACKFILL_REFRESH_CRON={cron!r} is not a cron schedule ({exc}): "
            "set five fields such as '0 3 * * 0' (Sundays at 03:00) or unset it"
        ) from None


refresh_schedule = refresh_schedule_for()  # on the default cron, for tests and tools; Definitions build their own
