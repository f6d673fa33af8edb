"""The run rescue sensor: requests again a partition whose run failed for the infrastructure, if Dagster gave up."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRecord,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    partition_loading_context,
    sensor,
)

from assets.embeddings import image_embeddings
from assets.index import faiss_index, search_index
from assets.models import model_version
from ops.sensors import INDEX_PRIORITY, INDEX_PRIORITY_TAG, RETRY_ALL_STEPS

# Dagster's own tags (their constants are private in dagster 1.13)
WILL_RETRY_TAG = "dagster/will_retry"  # "false" once Dagster's run retry gave up, or never meant to retry
PARTITION_TAG = "dagster/partition"
PARENT_RUN_TAG = "dagster/parent_run_id"  # on a run retry: the run it retries
ROOT_RUN_TAG = "dagster/root_run_id"
# the engine event of auto_run_reexecution when it could not create the retry run (a code location not loaded)
RETRY_NOT_CREATED = "Failed to retry run"

# Dagster launches a run retry within seconds of the failure; a failed run marked will_retry=true that has no
# retry this long after its last update lost it (seen on PostgreSQL: the retry was never launched)
PROMISED_GRACE_S = 180.0
RESCUE_OF_TAG = "backfill/rescue_of"  # the run the first rescue replaced (its Dagster retries carry it too)
RESCUE_COUNT_TAG = "backfill/rescue_count"

RESCUABLE = AssetSelection.assets(model_version, image_embeddings, faiss_index, search_index)
PARTITIONS = {a.key: a.partitions_def for a in (model_version, image_embeddings, faiss_index, search_index)}
RESCUABLE_KEYS = set(PARTITIONS)
INDEX_KEYS = {faiss_index.key, search_index.key}
IN_PROGRESS = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


@dataclass(frozen=True)
class RescueCursor:
    """The update time of the last failed run looked at, and the runs updated at that same instant."""

    updated: str | None = None  # ISO datetime, as the run storage returns it
    seen: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> RescueCursor:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(data["updated"], tuple(data["seen"]))

    def dump(self) -> str:
        return json.dumps({"updated": self.updated, "seen": list(self.seen)})

    def after(self, records: Iterable[RunRecord]) -> RescueCursor:
        cursor = self
        for record in records:
            stamp = record.update_timestamp.isoformat()
            seen = cursor.seen if stamp == cursor.updated else ()
            cursor = RescueCursor(stamp, (*seen, record.dagster_run.run_id))
        return cursor


def rescue_sensor(interval_s: int = 30, max_rescues: int = 3, per_tick: int = 50) -> SensorDefinition:
    """run_rescue_sensor, ticking every `interval_s` seconds, reading at most `per_tick` newly failed runs a tick
    and rescuing a run's partition at most `max_rescues` times (a location that never loads does not loop)."""

    def run_rescue_sensor(context: SensorEvaluationContext) -> SensorResult:
        return rescue_failed_runs(context, max_rescues, per_tick)

    return sensor(
        name="run_rescue_sensor",
        # asset_selection, not target: a target selection becomes one anonymous job, which cannot mix
        # image_embeddings' model_version x shard partitions with the version-partitioned assets
        asset_selection=RESCUABLE,
        minimum_interval_seconds=interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description="Requests again the partition of a run that failed before its step ran (its dequeue could not "
        "reach the code server) or whose run retry Dagster could not create, when Dagster will not retry it and "
        f"the partition is neither materialized since nor in progress; at most {max_rescues} times per run. "
        f"Also a failed run Dagster marked for a run retry that still does not exist {PROMISED_GRACE_S:.0f} s later. "
        "A step that ran and failed (a broken model, a failed check) is never rescued.",
    )(run_rescue_sensor)


def rescue_failed_runs(
    context: SensorEvaluationContext, max_rescues: int, per_tick: int, promised_grace_s: float = PROMISED_GRACE_S
) -> SensorResult:
    """The run requests for the failed runs updated since the cursor; O(new failures) reads per tick.

    Two streams, each with its own cursor: runs Dagster will not retry (`will_retry=false`), and runs it marked
    for a retry (`will_retry=true`) whose retry does not exist `promised_grace_s` after their last update.
    """
    instance = context.instance
    cursors = _parse_cursors(context.cursor)
    requests = []
    given_up, cursors["failed"] = _newly_failed(instance, cursors["failed"], {WILL_RETRY_TAG: "false"}, per_tick)
    before = datetime.now(timezone.utc) - timedelta(seconds=promised_grace_s)
    promised, cursors["promised"] = _newly_failed(
        instance, cursors["promised"], {WILL_RETRY_TAG: "true"}, per_tick, before
    )
    promised = [r for r in promised if not _has_retry(instance, r.dagster_run.run_id)]
    for record, lost_retry in [*((r, False) for r in given_up), *((r, True) for r in promised)]:
        request, why = rescue_request(instance, record, max_rescues, lost_retry=lost_retry)
        if request is not None:
            requests.append(request)
            context.log.info(f"rescuing run {record.dagster_run.run_id}: {why}")
        elif why:
            context.log.info(f"not rescuing run {record.dagster_run.run_id}: {why}")
    return SensorResult(run_requests=requests, cursor=json.dumps({k: json.loads(c.dump()) for k, c in cursors.items()}))


def _parse_cursors(text: str | None) -> dict[str, RescueCursor]:
    """{"failed": ..., "promised": ...}; a cursor of one stream (before the second) is the first's."""
    data = json.loads(text) if text else {}
    if "updated" in data:
        data = {"failed": data}
    return {k: RescueCursor.parse(json.dumps(data[k])) if k in data else RescueCursor() for k in ("failed", "promised")}


def _newly_failed(
    instance: DagsterInstance, cursor: RescueCursor, tags: dict[str, str], per_tick: int, before: datetime | None = None
) -> tuple[list[RunRecord], RescueCursor]:
    """Failed runs with `tags` updated after the cursor (and before `before`), oldest first, at most per_tick."""
    # updated_after is strict: step back a microsecond and skip the runs already seen at that instant
    since = datetime.fromisoformat(cursor.updated) - timedelta(microseconds=1) if cursor.updated else None
    records = instance.get_run_records(
        RunsFilter(statuses=[DagsterRunStatus.FAILURE], tags=tags, updated_after=since, updated_before=before),
        limit=per_tick + len(cursor.seen),
        order_by="update_timestamp",
        ascending=True,
    )
    records = [r for r in records if r.dagster_run.run_id not in cursor.seen][:per_tick]
    return records, cursor.after(records)


def _has_retry(instance: DagsterInstance, run_id: str) -> bool:
    return bool(instance.get_run_records(RunsFilter(tags={PARENT_RUN_TAG: run_id}), limit=1))


def rescue_request(
    instance: DagsterInstance, record: RunRecord, max_rescues: int, lost_retry: bool = False
) -> tuple[RunRequest | None, str]:
    """The request that replaces a failed run, or None and why not ("" for a run that is none of ours).

    lost_retry: Dagster marked the run for a retry that was never launched; however it failed, Dagster meant
    to run it again, so it is requested again (with the same partition checks and limit)."""
    run = record.dagster_run
    key = run.tags.get(PARTITION_TAG)
    selection = run.asset_selection
    if key is None or not selection or not selection <= RESCUABLE_KEYS:
        return None, ""
    if lost_retry:
        why = "Dagster marked it for a run retry (dagster/will_retry=true) that was never launched"
    else:
        why = infrastructure_failure(instance, run.run_id)
    if why is None:
        return None, "its step ran and failed (Dagster's run retries handle that, or it is permanent)"
    if not _partition_exists(instance, selection, key):
        # a version retired since: a request for it would fail the whole tick, and the cursor would not move
        return None, f"{why}, but its partition {key} no longer exists"
    count = int(run.tags.get(RESCUE_COUNT_TAG, "0"))
    if count >= max_rescues:
        return None, f"{why}, but its partition {key} was rescued {count} times already (the limit)"
    if _materialized_since(instance, selection, key, record.create_timestamp.timestamp()):
        return None, f"{why}, but {key} was materialized since"
    if _in_progress(instance, selection, key):
        return None, f"{why}, but a run of {key} is in progress"
    tags = _carried_tags(run.tags, selection)
    tags[RESCUE_OF_TAG] = run.tags.get(RESCUE_OF_TAG) or run.tags.get(ROOT_RUN_TAG) or run.run_id
    tags[RESCUE_COUNT_TAG] = str(count + 1)
    request = RunRequest(
        run_key=f"rescue:{run.run_id}",  # one rescue per failed run, even if a tick is evaluated twice
        asset_selection=sorted(selection, key=lambda k: k.to_user_string()),
        partition_key=key,
        tags=tags,
    )
    return request, f"{why}; requesting {key} again (rescue {count + 1} of {max_rescues})"


def infrastructure_failure(instance: DagsterInstance, run_id: str) -> str | None:
    """Why the run failed for the infrastructure, or None when a step of it started (a genuine failure)."""
    events = instance.get_records_for_run(
        run_id, of_type={DagsterEventType.ENGINE_EVENT, DagsterEventType.STEP_START}
    ).records
    messages = [
        r.event_log_entry.message
        for r in events
        if r.event_log_entry.dagster_event_type == DagsterEventType.ENGINE_EVENT
    ]
    if any(m.startswith(RETRY_NOT_CREATED) for m in messages):
        return "Dagster could not create its run retry (the code location was not loaded)"
    if not any(r.event_log_entry.dagster_event_type == DagsterEventType.STEP_START for r in events):
        return "it failed before any step started (its dequeue or launch failed)"
    return None


def _partition_exists(instance: DagsterInstance, selection: Iterable[AssetKey], key: str) -> bool:
    with partition_loading_context(dynamic_partitions_store=instance):
        return all(PARTITIONS[asset].has_partition_key(key) for asset in selection)


def _materialized_since(instance: DagsterInstance, selection: Iterable[AssetKey], key: str, since: float) -> bool:
    return all(
        instance.fetch_materializations(
            AssetRecordsFilter(asset_key=asset, asset_partitions=[key], after_timestamp=since), limit=1
        ).records
        for asset in selection
    )


def _in_progress(instance: DagsterInstance, selection: Iterable[AssetKey], key: str) -> bool:
    wanted = set(selection)
    # runs of one partition key are few (its retries and rescues): this reads a handful of records
    for record in instance.get_run_records(RunsFilter(statuses=IN_PROGRESS, tags={PARTITION_TAG: key}), limit=100):
        other = record.dagster_run.asset_selection
        if other is None or other & wanted:
            return True
    return False


def _carried_tags(tags: Mapping[str, str], selection: Iterable[AssetKey]) -> dict[str, str]:
    """The failed run's own tags (its pool), not Dagster's bookkeeping; the retry strategy and index priority."""
    carried = {k: v for k, v in tags.items() if not k.startswith("dagster/")}
    carried.update(RETRY_ALL_STEPS)  # as on the sensors' runs (ops/sensors.py)
    if INDEX_KEYS & set(selection):
        carried[INDEX_PRIORITY_TAG] = INDEX_PRIORITY
    elif INDEX_PRIORITY_TAG in tags:
        carried[INDEX_PRIORITY_TAG] = tags[INDEX_PRIORITY_TAG]
    return carried


run_rescue_sensor = rescue_sensor()  # at the default settings, for tests and tools; Definitions build their own
