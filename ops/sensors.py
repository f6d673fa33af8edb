"""The registry sensor adds partitions; the automation sensor turns new partitions into one backfill."""

import json
from collections.abc import Mapping

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from assets.embeddings import image_embeddings
from assets.index import faiss_index, search_index
from assets.models import model_version
from assets.partitions import model_versions, shards
from assets.resources import BackfillResource
from backfill.discovery import DiscoveryBudget, discover
from backfill.settings import Settings

# Intervals and pool tags come from Settings when the Definitions are built (ops/definitions.py),
# never from the environment at import: these factories take them as arguments.
DEFAULTS = Settings()


def registry_sensor(
    interval_s: int = DEFAULTS.sensor_interval_s, budget: DiscoveryBudget = DEFAULTS.discovery
) -> SensorDefinition:
    """model_registry_sensor, ticking every `interval_s` seconds (BACKFILL_SENSOR_INTERVAL), each tick reading at
    most `budget` (BACKFILL_DISCOVERY_*; the rest is found by the next tick: 10,000 new shards in ~10 ticks)."""

    def model_registry_sensor(
        context: SensorEvaluationContext, backfill: BackfillResource
    ) -> SensorResult | SkipReason:
        return add_registry_partitions(context, backfill, budget)

    return sensor(
        name="model_registry_sensor",
        minimum_interval_seconds=interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description="Adds a model_version partition for each new version whose model.json parses (the model_version "
        "asset then verifies, loads and probes it) and a shard partition for each new valid manifest shard, reading "
        "only new manifests, at most a budget per tick; anything else is skipped with its reason in the tick log. "
        "Deletes the partitions of versions retired with `backfill retire`. "
        "The backfill_automation sensor then embeds the new partitions as one backfill.",
    )(model_registry_sensor)


def add_registry_partitions(
    context: SensorEvaluationContext, backfill: BackfillResource, budget: DiscoveryBudget
) -> SensorResult | SkipReason:
    found = discover(
        backfill.layout(),
        backfill.model,
        known_versions=set(context.instance.get_dynamic_partitions(model_versions.name)),
        known_shards=set(context.instance.get_dynamic_partitions(shards.name)),
        budget=budget,
    )
    for what, why in found.skipped.items():
        context.log.warning(f"skipping {what}: {why}")
    if found.unverified:
        context.log.warning(
            f"shards {found.unverified}: id ranges overlap too many ids to check in a tick; "
            "uniqueness is checked before their index is published"
        )
    cursor = json.dumps(
        {
            "versions": found.versions,
            "shards": len(found.shards),
            "pending": found.pending,
            "skipped": sorted(found.skipped),
        }
    )
    requests = []
    # shards first: a version added in the same tick must see every shard
    if found.new_shards:
        requests.append(shards.build_add_request(found.new_shards))
    if found.new_versions:
        requests.append(model_versions.build_add_request(found.new_versions))
    if found.retired:
        # retired with `backfill retire` (or the retire job): keeps Dagster's partition count bounded
        requests.append(model_versions.build_delete_request(found.retired))
    later = f"; {found.pending} shards left for the next tick" if found.pending else ""
    later += f" (versions {found.held_versions} wait for them)" if found.held_versions else ""
    if not requests:
        why = f"no new versions of {backfill.model} or manifest shards{later}"
        if found.skipped:
            why += "; skipped: " + "; ".join(f"{what}: {reason}" for what, reason in found.skipped.items())
        context.update_cursor(cursor)
        return SkipReason(why)
    context.log.info(
        f"adding versions {found.new_versions} and {len(found.new_shards)} shards; "
        f"deleting retired versions {found.retired}{later}"
    )
    return SensorResult(dynamic_partitions_requests=requests, cursor=cursor)


model_registry_sensor = registry_sensor()  # at the default interval, for tests and tools; Definitions build their own

# the QueuedRunCoordinator dequeues higher dagster/priority first (default 0)
INDEX_PRIORITY_TAG, INDEX_PRIORITY = "dagster/priority", "10"
# on every run the sensors launch: a run retry re-executes the whole run (one shard, or index + publish); the
# default "from failure" finds nothing to redo when the run worker died before its step started
RETRY_ALL_STEPS = {"dagster/retry_strategy": "ALL_STEPS"}


def backfill_automation(
    interval_s: int = DEFAULTS.automation_interval_s, pool_tags: Mapping[str, str] | None = None
) -> AutomationConditionSensorDefinition:
    """The sensor that turns new shard partitions into one backfill, on the pool of `pool_tags` (BACKFILL_POOL)."""
    # Public API: declarative automation emits one backfill per tick for all partitions that
    # became missing (every shard of a new version). RunRequest.for_asset_graph_subset would do
    # the same from a plain sensor, but it is private in Dagster 1.13.
    return AutomationConditionSensorDefinition(
        "backfill_automation",
        target=AssetSelection.assets(image_embeddings),
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=interval_s,
        emit_backfills=True,
        # BACKFILL_POOL: the pool (deploy/pools.yaml) of the backfills this sensor launches
        run_tags={**RETRY_ALL_STEPS, **(pool_tags or {})},
        description="Launches one backfill for the shard partitions the registry sensor added (a new version: all its "
        "shards; a new manifest shard: that shard for every version).",
    )


def index_automation(interval_s: int = DEFAULTS.automation_interval_s) -> AutomationConditionSensorDefinition:
    """The sensor that builds and publishes a version's index once its shards are in."""
    # The index build and publish are one run per version, launched as a plain run: a backfill
    # is only picked up by the backfill daemon's loop (every 30 s in Dagster 1.13), which would
    # add up to 30 s to every near-line update for nothing (there is one partition to run).
    return AutomationConditionSensorDefinition(
        "index_automation",
        target=AssetSelection.assets(model_version, faiss_index, search_index),  # model_version: a plain run too
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=interval_s,
        emit_backfills=False,
        # no BACKFILL_POOL tag: its run limit is the embedding backfill's, and a near-line update must
        # not queue behind a big backfill (index steps run on indexPool, or the run launcher's
        # on-demand placement); a higher priority puts it ahead of queued embedding runs
        run_tags={**RETRY_ALL_STEPS, INDEX_PRIORITY_TAG: INDEX_PRIORITY},
        description="Builds (or updates, for new shards) and publishes a version's index once none of its shards is "
        "missing or running.",
    )
