"""run_rescue_sensor: a run Dagster gave up on for the infrastructure is requested again once, and nothing else is."""

import json

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    Definitions,
    MultiPartitionKey,
    RunRequest,
    SensorResult,
    build_sensor_context,
    instance_for_test,
)

from backfill.registry import register_version
from backfill.settings import Settings
from ops.definitions import build_definitions
from ops.rescue import RESCUE_COUNT_TAG, RESCUE_OF_TAG, rescue_failed_runs, run_rescue_sensor
from tests.dagster.test_models import verify

EMBED = [AssetKey("image_embeddings")]
INDEX = [AssetKey("faiss_index"), AssetKey("search_index")]
VERIFY = [AssetKey("model_version")]
SHARD = str(MultiPartitionKey({"model_version": "v1", "shard": "shard-00000"}))


@pytest.fixture
def defs(tmp_path) -> Definitions:
    return build_definitions(Settings(root=str(tmp_path / "root")))


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("model_version", ["v1"])
        instance.add_dynamic_partitions("shard", ["shard-00000"])
        yield instance


def submitted_run(instance: DagsterInstance, defs: Definitions, assets, key: str, **tags):
    """A run of the partition as a sensor submits it, before the queue picks it up (NOT_STARTED: in progress)."""
    job = defs.resolve_implicit_global_asset_job_def()
    return instance.create_run_for_job(job, asset_selection=frozenset(assets), tags={"dagster/partition": key, **tags})


def retry_not_created(instance: DagsterInstance, defs: Definitions, assets, key: str, **tags) -> str:
    """The chaos round's state: the dequeue failed (code server down), then Dagster's run retry could not be made."""
    run = submitted_run(instance, defs, assets, key, **tags)
    instance.report_engine_event("Caught an unrecoverable error while dequeuing the run", run)
    instance.report_run_failed(run)
    # what auto_run_reexecution does when creating the retry raises DagsterCodeLocationLoadError
    instance.report_engine_event("Failed to retry run", run)
    instance.add_run_tags(run.run_id, {"dagster/will_retry": "false"})
    return run.run_id


def dequeue_gave_up(instance: DagsterInstance, defs: Definitions, assets, key: str) -> str:
    """A dequeue that failed after max_user_code_failure_retries, and whose run retries are spent."""
    run = submitted_run(instance, defs, assets, key)
    instance.report_engine_event("Run dequeue failed to reach the user code server after 3 attempts, failing run", run)
    instance.report_run_failed(run)
    instance.add_run_tags(run.run_id, {"dagster/will_retry": "false"})
    return run.run_id


def tick(instance: DagsterInstance, defs: Definitions, cursor: str | None = None) -> SensorResult:
    """One tick of the sensor the shipped Definitions run."""
    with build_sensor_context(instance=instance, cursor=cursor, definitions=defs) as context:
        return defs.get_repository_def().get_sensor_def("run_rescue_sensor")(context)


def test_a_verification_whose_retry_could_not_be_created_is_requested_again_once(instance, defs):
    failed = retry_not_created(instance, defs, VERIFY, "v1", **{"dagster/retry_strategy": "ALL_STEPS"})
    result = tick(instance, defs)
    assert result.run_requests == [
        RunRequest(
            run_key=f"rescue:{failed}",
            asset_selection=VERIFY,
            partition_key="v1",
            tags={"dagster/retry_strategy": "ALL_STEPS", RESCUE_OF_TAG: failed, RESCUE_COUNT_TAG: "1"},
        )
    ]
    # the cursor: a second tick reads nothing it has seen, and requests nothing
    assert json.loads(result.cursor)["failed"]["seen"] == [failed]
    assert tick(instance, defs, result.cursor).run_requests == []


def test_an_embedding_and_an_index_run_keep_their_partition_pool_and_priority(instance, defs):
    embed = retry_not_created(instance, defs, EMBED, SHARD, **{"backfill/pool": "cpu-tidal", "dagster/backfill": "b1"})
    index = dequeue_gave_up(instance, defs, INDEX, "v1")
    requests = {r.partition_key: r for r in tick(instance, defs).run_requests}
    assert set(requests) == {SHARD, "v1"}
    assert requests[SHARD].asset_selection == EMBED and requests[SHARD].tags == {
        "backfill/pool": "cpu-tidal",
        "dagster/retry_strategy": "ALL_STEPS",
        RESCUE_OF_TAG: embed,
        RESCUE_COUNT_TAG: "1",
    }
    assert requests["v1"].asset_selection == INDEX and requests["v1"].tags == {
        "dagster/retry_strategy": "ALL_STEPS",
        "dagster/priority": "10",
        RESCUE_OF_TAG: index,
        RESCUE_COUNT_TAG: "1",
    }


def test_the_requests_resolve_to_runs_of_the_real_definitions(instance, defs):
    # what the sensor daemon does with them: the multi-partitioned shard key and the graph-backed faiss_index
    # resolve against the Definitions' asset graph to the implicit asset job, with Dagster's partition tags
    retry_not_created(instance, defs, EMBED, SHARD)
    retry_not_created(instance, defs, INDEX, "v1")
    # with the instance's ref, as the code server builds it: partition keys are checked against the instance
    with build_sensor_context(instance=instance, instance_ref=instance.get_ref(), definitions=defs) as context:
        data = run_rescue_sensor.evaluate_tick(context)
    resolved = {r.partition_key: r for r in data.run_requests}
    assert resolved[SHARD].job_name == resolved["v1"].job_name == "__ASSET_JOB"
    assert resolved[SHARD].tags["dagster/partition/model_version"] == "v1"
    assert resolved[SHARD].tags["dagster/partition/shard"] == "shard-00000"
    assert resolved["v1"].tags["dagster/partition"] == "v1" and resolved["v1"].asset_selection == INDEX


def test_a_genuine_step_failure_is_not_rescued(registered, defs):
    layout, _ = registered
    register_version(layout, "refcnn", "v2", b"not a torchscript archive", dim=16, input_size=32)
    with instance_for_test() as instance:
        result = verify(instance, layout, "v2")  # a real run: the step ran and failed verification
        assert not result.success
        instance.add_run_tags(result.run_id, {"dagster/will_retry": "false"})
        assert tick(instance, defs).run_requests == []


def test_a_partition_materialized_since_or_in_progress_is_not_requested(instance, defs):
    retry_not_created(instance, defs, VERIFY, "v1")
    submitted_run(instance, defs, VERIFY, "v1")  # e.g. an operator's launch
    retry_not_created(instance, defs, EMBED, SHARD)
    instance.report_runless_asset_event(_materialization(SHARD))
    assert tick(instance, defs).run_requests == []


def test_a_partition_deleted_since_is_not_requested(instance, defs):
    # a retired version: its request would fail the whole tick, and every tick after it
    retry_not_created(instance, defs, VERIFY, "v1")
    retry_not_created(instance, defs, EMBED, SHARD)
    instance.delete_dynamic_partition("model_version", "v1")
    result = tick(instance, defs)
    assert result.run_requests == []
    # the tick succeeded and its cursor moved past them: the next failure is requested
    instance.add_dynamic_partitions("model_version", ["v2"])
    later = retry_not_created(instance, defs, VERIFY, "v2")
    assert [r.run_key for r in tick(instance, defs, result.cursor).run_requests] == [f"rescue:{later}"]


def test_rescues_stop_after_the_limit(instance, defs):
    original = retry_not_created(instance, defs, VERIFY, "v1")
    cursor, rescued = None, []
    for _ in range(5):
        result = tick(instance, defs, cursor)
        cursor = result.cursor
        rescued += result.run_requests
        for request in result.run_requests:  # each rescue run fails the same way (the location never loads)
            retry_not_created(instance, defs, VERIFY, "v1", **request.tags)
    assert [r.tags[RESCUE_COUNT_TAG] for r in rescued] == ["1", "2", "3"]
    assert {r.tags[RESCUE_OF_TAG] for r in rescued} == {original}


def test_a_tick_reads_at_most_its_budget_and_the_next_one_the_rest(instance, defs):
    instance.add_dynamic_partitions("model_version", ["v2", "v3"])
    failed = [retry_not_created(instance, defs, VERIFY, version) for version in ("v1", "v2", "v3")]
    per_tick, cursor = [], None
    for _ in range(3):
        with build_sensor_context(instance=instance, cursor=cursor, definitions=defs) as context:
            result = rescue_failed_runs(context, max_rescues=3, per_tick=2)
        cursor = result.cursor
        per_tick.append([r.run_key for r in result.run_requests])
    assert per_tick == [[f"rescue:{failed[0]}", f"rescue:{failed[1]}"], [f"rescue:{failed[2]}"], []]


def _materialization(key: str):
    from dagster import AssetMaterialization

    return AssetMaterialization(asset_key="image_embeddings", partition=key)


def test_a_run_whose_marked_retry_was_never_launched_is_requested_again(instance, defs):
    """The CI's chaos round on PostgreSQL: run monitoring failed a run whose worker was killed, Dagster marked it
    will_retry=true and never launched the retry, so its shard was never embedded."""
    lost = submitted_run(instance, defs, EMBED, SHARD)
    instance.report_run_failed(lost)
    instance.add_run_tags(lost.run_id, {"dagster/will_retry": "true"})
    instance.add_dynamic_partitions("shard", ["shard-00001"])
    other = str(MultiPartitionKey({"model_version": "v1", "shard": "shard-00001"}))
    retried = submitted_run(instance, defs, EMBED, other)
    instance.report_run_failed(retried)
    instance.add_run_tags(retried.run_id, {"dagster/will_retry": "true"})
    instance.report_run_failed(submitted_run(instance, defs, EMBED, other, **{"dagster/parent_run_id": retried.run_id}))
    with build_sensor_context(instance=instance, definitions=defs) as context:
        assert rescue_failed_runs(context, 3, 50).run_requests == []  # within the grace Dagster may still launch it
        result = rescue_failed_runs(context, 3, 50, promised_grace_s=0)
    # only the run without a retry; the one whose retry exists is Dagster's
    assert [(r.run_key, r.partition_key) for r in result.run_requests] == [(f"rescue:{lost.run_id}", SHARD)]
    assert result.run_requests[0].tags[RESCUE_COUNT_TAG] == "1"
    with build_sensor_context(instance=instance, definitions=defs, cursor=result.cursor) as context:
        assert rescue_failed_runs(context, 3, 50, promised_grace_s=0).run_requests == []  # seen: not again
    # a cursor written before this stream existed is the first stream's
    old = json.dumps(json.loads(result.cursor)["failed"])
    with build_sensor_context(instance=instance, definitions=defs, cursor=old) as context:
        assert len(rescue_failed_runs(context, 3, 50, promised_grace_s=0).run_requests) == 1
