"""Sensor and schedule evaluations: exact requests and cursors."""

import json

from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    MultiPartitionKey,
    SensorResult,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
)

from assets.resources import BackfillResource
from backfill.registry import CARD
from ops.schedules import refresh_schedule
from ops.sensors import model_registry_sensor
from tests.conftest import MODEL, register_tiny

SHARDS = ["shard-00000", "shard-00001", "shard-00002"]


def tick(instance: DagsterInstance, root: str, cursor: str | None = None):
    context = build_sensor_context(instance=instance, cursor=cursor, resources={"backfill": BackfillResource(root=root)})
    return model_registry_sensor(context), context


def test_new_version_adds_its_partition_and_all_shards(registered):
    layout, _ = registered
    with instance_for_test() as instance:
        result, _ = tick(instance, layout.store.root)
        assert isinstance(result, SensorResult)
        assert result.dynamic_partitions_requests == [
            AddDynamicPartitionsRequest(partitions_def_name="shard", partition_keys=SHARDS),
            AddDynamicPartitionsRequest(partitions_def_name="model_version", partition_keys=["v1"]),
        ]
        assert result.run_requests == []  # the automation sensor turns these partitions into one backfill
        assert json.loads(result.cursor) == {"versions": ["v1"], "shards": 3, "skipped": []}


def test_second_tick_skips_and_a_later_version_is_added_alone(registered):
    layout, _ = registered
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, context = tick(instance, layout.store.root)
        assert isinstance(result, SkipReason) and "no new versions of refcnn" in result.skip_message
        assert json.loads(context.cursor) == {"versions": ["v1"], "shards": 3, "skipped": []}

        register_tiny(layout, "v2")
        result, _ = tick(instance, layout.store.root, cursor=context.cursor)
        assert result.dynamic_partitions_requests == [
            AddDynamicPartitionsRequest(partitions_def_name="model_version", partition_keys=["v2"])
        ]
        assert json.loads(result.cursor) == {"versions": ["v1", "v2"], "shards": 3, "skipped": []}


def test_invalid_version_is_skipped_with_its_reason(registered):
    layout, _ = registered
    layout.store.write_bytes(f"{layout.model_dir(MODEL, 'v2')}/{CARD}", b'{"name": "refcnn"}')
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, context = tick(instance, layout.store.root)
        assert isinstance(result, SkipReason)
        assert "skipped invalid versions: v2: model version at refcnn/v2: model.json is missing 'version'" in result.skip_message
        assert json.loads(context.cursor)["skipped"] == ["v2"]


def test_refresh_schedule_skips_until_something_is_published(registered):
    layout, _ = registered
    with instance_for_test() as instance:
        context = build_schedule_context(instance=instance, resources={"backfill": BackfillResource(root=layout.store.root)})
        result = refresh_schedule(context)
        assert isinstance(result, SkipReason) and "nothing is published" in result.skip_message


def test_refresh_schedule_requests_every_shard_of_the_serving_version(registered):
    layout, _ = registered
    layout.store.write_json(layout.pointer(MODEL), {"version": "v1", "build_id": "v1-x"})
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        import datetime

        when = datetime.datetime(2026, 11, 29, 3, 0, tzinfo=datetime.timezone.utc)
        context = build_schedule_context(
            instance=instance, resources={"backfill": BackfillResource(root=layout.store.root)}, scheduled_execution_time=when
        )
        requests = refresh_schedule(context)
        assert [r.partition_key for r in requests] == [MultiPartitionKey({"model_version": "v1", "shard": s}) for s in SHARDS]
        assert [r.run_key for r in requests] == [f"refresh-v1-{s}-20261129T0300" for s in SHARDS]
