"""The registry sensor adds partitions; the automation sensor turns new partitions into one backfill."""

import json
import os

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from assets.embeddings import image_embeddings
from assets.index import faiss_index, search_index
from assets.partitions import model_versions, shards
from assets.resources import BackfillResource
from backfill.manifest import list_shards
from backfill.registry import list_versions

REGISTRY_INTERVAL_S = int(os.environ.get("BACKFILL_SENSOR_INTERVAL", "30"))


@sensor(
    name="model_registry_sensor",
    minimum_interval_seconds=REGISTRY_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a model_version partition for each new valid version in the registry, and a shard partition "
    "for each new manifest shard. The backfill_automation sensor then embeds the new partitions as one backfill.",
)
def model_registry_sensor(context: SensorEvaluationContext, backfill: BackfillResource) -> SensorResult | SkipReason:
    layout = backfill.layout()
    cards, skipped = list_versions(layout, backfill.model)
    for version, reason in skipped.items():
        context.log.warning(f"skipping {backfill.model}/{version}: {reason}")
    known_versions = set(context.instance.get_dynamic_partitions(model_versions.name))
    known_shards = set(context.instance.get_dynamic_partitions(shards.name))
    found_shards = list_shards(layout)
    new_shards = [s for s in found_shards if s not in known_shards]
    new_versions = [c.version for c in cards if c.version not in known_versions]
    cursor = json.dumps({"versions": [c.version for c in cards], "shards": len(found_shards), "skipped": sorted(skipped)})
    requests = []
    # shards first: a version added in the same tick must see every shard
    if new_shards:
        requests.append(shards.build_add_request(new_shards))
    if new_versions:
        requests.append(model_versions.build_add_request(new_versions))
    if not requests:
        why = f"no new versions of {backfill.model} or manifest shards"
        if skipped:
            why += "; skipped invalid versions: " + "; ".join(f"{v}: {r}" for v, r in skipped.items())
        context.update_cursor(cursor)
        return SkipReason(why)
    context.log.info(f"adding versions {new_versions} and {len(new_shards)} shards")
    return SensorResult(dynamic_partitions_requests=requests, cursor=cursor)


AUTOMATION_INTERVAL_S = int(os.environ.get("BACKFILL_AUTOMATION_INTERVAL", "30"))

# Public API: declarative automation emits one backfill per tick for all partitions that
# became missing (every shard of a new version), including the index build and publish
# that depend on them. RunRequest.for_asset_graph_subset would do the same from a plain
# sensor, but it is private in Dagster 1.13.
backfill_automation = AutomationConditionSensorDefinition(
    "backfill_automation",
    target=AssetSelection.assets(image_embeddings, faiss_index, search_index),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=AUTOMATION_INTERVAL_S,
    emit_backfills=True,
    description="Launches one backfill for the partitions the registry sensor added, then index build and publish.",
)
