"""A periodic refresh (reconciliation) of the serving version's embeddings (off by default)."""

import os

from dagster import DefaultScheduleStatus, MultiPartitionKey, RunRequest, ScheduleEvaluationContext, SkipReason, define_asset_job, schedule

from assets.embeddings import image_embeddings
from assets.partitions import shards
from assets.pools import pool_tags_from_env
from assets.resources import BackfillResource
from backfill.publish import read_pointer

embed_job = define_asset_job("embed_job", selection=[image_embeddings])

REFRESH_CRON = os.environ.get("BACKFILL_REFRESH_CRON", "0 3 * * 0")


@schedule(
    name="refresh_schedule",
    cron_schedule=REFRESH_CRON,
    job=embed_job,
    default_status=DefaultScheduleStatus.STOPPED,
    description="Re-runs every shard partition of the serving model version: a shard whose completion marker is "
    "in storage is verified and kept (the model is deterministic, so embedding it again would write the same "
    "vectors), a shard that is missing or incomplete (lost data, a failed partition) is embedded; then "
    "faiss_index and search_index rebuild and republish. Dagster 1.13 schedules cannot launch a backfill, so "
    "this launches one run per shard.",
)
def refresh_schedule(context: ScheduleEvaluationContext, backfill: BackfillResource):
    pointer = read_pointer(backfill.layout(), backfill.model)
    if pointer is None:
        return SkipReason(f"nothing is published for {backfill.model} yet: nothing to refresh")
    version = pointer["version"]
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return [
        RunRequest(
            run_key=f"refresh-{version}-{shard}-{tick}",
            partition_key=MultiPartitionKey({"model_version": version, "shard": shard}),
            tags={"backfill/refresh": tick, **pool_tags_from_env()},
        )
        for shard in context.instance.get_dynamic_partitions(shards.name)
    ]
