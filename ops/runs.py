"""A version's image_embeddings runs and materializations read from the Dagster instance, as the report's facts."""

from __future__ import annotations

import statistics

from dagster import AssetKey, AssetRecordsFilter, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from backfill.errors import ConfigError
from backfill.plan import Startup
from backfill.report import PartitionFacts, PoolFacts, RunFacts
from ops.pools import POOL_TAG, Pools

VERSION_TAG = "dagster/partition/model_version"  # set on every run of one image_embeddings partition
SHARD_TAG = "dagster/partition/shard"
EMBEDDINGS = AssetKey("image_embeddings")
PAGE = 1000


def embedding_runs(instance: DagsterInstance, version: str) -> list[RunFacts]:
    """Every run of the version's image_embeddings partitions: retries, failures and preempted ones included."""
    facts = []
    for record in instance.get_run_records(RunsFilter(tags={VERSION_TAG: version})):
        run = record.dagster_run
        retries, preempted, abandoned = _step_retries(instance, run.run_id)
        facts.append(
            RunFacts(
                shard=run.tags.get(SHARD_TAG, ""),
                status=run.status.value,
                created=record.create_timestamp.timestamp(),
                started=record.start_time,
                ended=record.end_time,
                pool=run.tags.get(POOL_TAG, ""),
                retry_of=run.tags.get("dagster/parent_run_id", ""),
                step_retries=retries,
                preemptions=preempted,
                chunks_abandoned=abandoned,
            )
        )
    return facts


def _step_retries(instance: DagsterInstance, run_id: str) -> tuple[int, int, int]:
    """(step retries, preemptions among them, preemptions that abandoned a chunk) from the run's retry events."""
    retries = preempted = abandoned = 0
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY):
        retries += 1
        error = entry.dagster_event.event_specific_data.error if entry.dagster_event else None
        text = _error_text(error)
        preempted += "Preempted" in text
        abandoned += "chunk abandoned" in text
    return retries, preempted, abandoned


def _error_text(error) -> str:
    """The message of an error and of its causes (RetryRequested is raised from the engine's Preempted)."""
    parts = []
    while error is not None:
        parts.append(f"{error.cls_name}: {error.message}")
        error = error.cause or error.context
    return "\n".join(parts)


def embedding_partitions(instance: DagsterInstance, version: str, shards: list[str]) -> list[PartitionFacts]:
    """The metadata of each shard's latest materialization by `version` (shards not materialized are left out)."""
    keys = [f"{version}|{s}" for s in shards]
    latest: dict[str, PartitionFacts] = {}
    for start in range(0, len(keys), PAGE):
        records_filter = AssetRecordsFilter(asset_key=EMBEDDINGS, asset_partitions=keys[start : start + PAGE])
        cursor = None
        while True:
            page = instance.fetch_materializations(records_filter, limit=PAGE, cursor=cursor)
            for record in page.records:
                m = record.asset_materialization
                if m is not None and m.partition not in latest:
                    latest[m.partition] = _partition(m.partition.split("|", 1)[1], m.metadata)
            if not page.has_more:
                break
            cursor = page.cursor
    return list(latest.values())


def _partition(shard: str, metadata: dict) -> PartitionFacts:
    value = lambda key, default=0.0: metadata[key].value if key in metadata else default  # noqa: E731
    stages = {k[len("stage_") : -len("_s")]: v.value for k, v in metadata.items() if k.startswith("stage_")}
    return PartitionFacts(
        shard=shard,
        images_per_s=float(value("images_per_s")),
        wall_s=float(value("wall_s")),
        # before this field: a partition that reported a rate embedded rows
        embedded_now=int(value("embedded_now", metadata["images"].value if value("images_per_s") else 0)),
        stage_s=stages,
    )


def pool_facts(pools: Pools | None, local_cpus: float) -> dict[str, PoolFacts]:
    """Per pool tag: a pod's CPUs, GPUs, spot or not, prices; "" (no tag: the local default) is this machine."""
    facts = {"": PoolFacts(cpus=local_cpus)}
    for name, pool in (pools.pools if pools else {}).items():
        facts[name] = PoolFacts(pool.cpus, pool.gpus, pool.spot, pool.price_spot, pool.price_on_demand)
    return facts


def local_slots(instance: DagsterInstance) -> int:
    """Runs the instance starts at once (the queued run coordinator's max_concurrent_runs; 1 without one)."""
    queue = instance.get_concurrency_config().run_queue_config
    limit = queue.max_concurrent_runs if queue is not None else 1
    return limit if limit and limit > 0 else 1


def measured_startup(instance: DagsterInstance, limit: int = 100) -> Startup | None:
    """The median seconds per partition beyond its compute, over this instance's finished embedding runs.

    Per run (run_phases, one event query): its worker's launch, its step process's start, its step beyond the
    partition's own wall_s (imports, resources, the model's load, the re-verification) and its finish. Waiting
    in the queue for a free slot is not start-up and is left out. Where the runs recorded their model's load
    (model_load_s), it is taken out, and the plan adds the planned version's own. None before any embedding
    run has succeeded here.
    """
    per_run: list[tuple[float, float | None]] = []
    for record in instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.SUCCESS]), limit=limit):
        if VERSION_TAG not in record.dagster_run.tags:
            continue
        phases = run_phases(instance, record.dagster_run.run_id, record)
        if "body" not in phases or "step" not in phases:
            continue
        beyond = sum(phases.get(p, 0.0) for p in PHASES if p != "queued") - phases["body"]
        per_run.append((beyond, phases.get("model_load")))
    if not per_run:
        return None
    without_load = [beyond - load for beyond, load in per_run if load is not None]
    if without_load:
        source = f"median of {len(without_load)} earlier runs on this instance, their model's load taken out"
        return Startup(statistics.median(without_load), source, add_model_load=True)
    return Startup(
        statistics.median([b for b, _ in per_run]), f"median of {len(per_run)} earlier runs on this instance"
    )


PHASES = ("queued", "launch", "to_step", "step", "finish")


def run_phases(instance: DagsterInstance, run_id: str, record=None) -> dict[str, float]:
    """Where a finished run's time went, in seconds (one event query): `queued` (created -> its worker being
    started: the queue, a free slot), `launch` (-> the run's start: the run worker's process and imports),
    `to_step` (-> its first step's start: the step process), `step` (-> its last step's end; `body` is the
    partition's own wall_s inside it, when it reported one) and `finish` (-> the run's end). A phase whose
    events are missing (a run executed in process has no RUN_STARTING) is left out. `model_load` is the
    partition's model_load_s, when it reported one. `record`: the run's record, when the caller has it.
    """
    record = record or instance.get_run_record_by_id(run_id)
    if record is None:
        raise ConfigError(f"run {run_id}: not on this instance")
    at: dict[str, float] = {"created": record.create_timestamp.timestamp()}
    step_ends = (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE)
    for entry in instance.all_logs(run_id):
        kind = entry.dagster_event_type
        if kind == DagsterEventType.RUN_STARTING:
            at.setdefault("starting", entry.timestamp)
        elif kind == DagsterEventType.RUN_START:
            at.setdefault("start", entry.timestamp)
        elif kind == DagsterEventType.STEP_START:
            at.setdefault("step_start", entry.timestamp)
        elif kind in step_ends:
            at["step_end"] = entry.timestamp
        elif kind == DagsterEventType.ASSET_MATERIALIZATION and entry.asset_materialization is not None:
            metadata = entry.asset_materialization.metadata
            for key, name in (("wall_s", "body"), ("model_load_s", "model_load")):
                if key in metadata:
                    at[name] = float(metadata[key].value)
    if record.end_time:
        at["end"] = record.end_time
    marks = [("queued", "created", "starting"), ("launch", "starting", "start"), ("to_step", "start", "step_start"),
             ("step", "step_start", "step_end"), ("finish", "step_end", "end")]  # fmt: skip
    phases = {name: at[b] - at[a] for name, a, b in marks if a in at and b in at}
    phases.update({name: at[name] for name in ("body", "model_load") if name in at})
    return phases
