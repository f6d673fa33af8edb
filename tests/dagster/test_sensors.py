"""Sensor and schedule evaluations: exact requests and cursors."""

import json

import pyarrow as pa
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
from backfill.manifest import read_shard, write_shard
from backfill.registry import CARD, register_version
from backfill.settings import Settings
from backfill.storage import Store
from ops.definitions import build_definitions
from ops.schedules import refresh_schedule
from ops.sensors import model_registry_sensor
from tests.conftest import MODEL, register_tiny

SHARDS = ["shard-00000", "shard-00001", "shard-00002"]


# Contexts are closed before their instance (`with`): a context builds a second instance from the first's ref,
# and if garbage collection closes it later, it restores a closed instance as Dagster's current defs-state
# storage, and a later Definitions load fails ("Attempted to resolve undefined DagsterInstance weakref").
def tick(instance: DagsterInstance, root: str, cursor: str | None = None, sensor=model_registry_sensor):
    with build_sensor_context(
        instance=instance, cursor=cursor, resources={"backfill": BackfillResource(root=root)}
    ) as context:
        return sensor(context), context


def refresh(instance: DagsterInstance, root: str, when=None):
    with build_schedule_context(
        instance=instance, resources={"backfill": BackfillResource(root=root)}, scheduled_execution_time=when
    ) as context:
        return refresh_schedule(context)


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
        assert json.loads(result.cursor) == {"versions": ["v1"], "shards": 3, "pending": 0, "skipped": []}


def test_second_tick_skips_and_a_later_version_is_added_alone(registered):
    layout, _ = registered
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, context = tick(instance, layout.store.root)
        assert isinstance(result, SkipReason) and "no new versions of refcnn" in result.skip_message
        assert json.loads(context.cursor) == {"versions": ["v1"], "shards": 3, "pending": 0, "skipped": []}

        register_tiny(layout, "v2")
        result, _ = tick(instance, layout.store.root, cursor=context.cursor)
        assert result.dynamic_partitions_requests == [
            AddDynamicPartitionsRequest(partitions_def_name="model_version", partition_keys=["v2"])
        ]
        assert json.loads(result.cursor) == {"versions": ["v1", "v2"], "shards": 3, "pending": 0, "skipped": []}


def test_invalid_version_is_skipped_with_its_reason(registered):
    layout, _ = registered
    layout.store.write_bytes(f"{layout.model_dir(MODEL, 'v2')}/{CARD}", b'{"name": "refcnn"}')
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, context = tick(instance, layout.store.root)
        assert isinstance(result, SkipReason)
        assert "skipped: version v2: model version at refcnn/v2: model.json is missing 'version'" in result.skip_message
        assert json.loads(context.cursor)["skipped"] == ["version v2"]


def test_refresh_schedule_skips_until_something_is_published(registered):
    layout, _ = registered
    with instance_for_test() as instance:
        result = refresh(instance, layout.store.root)
        assert isinstance(result, SkipReason) and "nothing is published" in result.skip_message


def test_refresh_schedule_requests_every_shard_of_the_serving_version(registered):
    layout, _ = registered
    layout.store.write_json(layout.pointer(MODEL), {"version": "v1", "build_id": "v1-x"})
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        import datetime

        when = datetime.datetime(2026, 11, 29, 3, 0, tzinfo=datetime.timezone.utc)
        requests = refresh(instance, layout.store.root, when)
        assert [r.partition_key for r in requests] == [
            MultiPartitionKey({"model_version": "v1", "shard": s}) for s in SHARDS
        ]
        assert [r.run_key for r in requests] == [f"refresh-v1-{s}-20261129T0300" for s in SHARDS]


def test_a_new_version_is_added_from_its_card_alone(registered, monkeypatch):
    # verification (checksum, load, probe batch) is the model_version asset's step, not the sensor's:
    # a 2 GB artifact is never read inside a tick, and a broken one is a red check (test_models.py)
    layout, _ = registered
    register_version(layout, MODEL, "v2", b"not a torchscript archive", dim=16, input_size=32)
    read = []
    original = Store.read_bytes
    monkeypatch.setattr(Store, "read_bytes", lambda self, path: read.append(path) or original(self, path))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, _ = tick(instance, layout.store.root)
        assert result.dynamic_partitions_requests == [
            AddDynamicPartitionsRequest(partitions_def_name="model_version", partition_keys=["v2"])
        ]
    assert not [p for p in read if p.endswith(".pt")], read


def test_a_new_shard_repeating_an_image_id_is_refused_before_any_work(registered):
    layout, _ = registered
    taken = int(read_shard(layout, "shard-00001").image_ids[0])
    write_shard(
        layout, "shard-00003", pa.table({"image_id": pa.array([taken, 10_000], pa.int64()), "uri": ["a.jpg", "b.jpg"]})
    )
    write_shard(layout, "shard-00004", pa.table({"image_id": pa.array([10_001], pa.int64()), "uri": ["c.jpg"]}))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, _ = tick(instance, layout.store.root)
        assert result.dynamic_partitions_requests == [
            AddDynamicPartitionsRequest(partitions_def_name="shard", partition_keys=["shard-00004"])
        ]
        assert json.loads(result.cursor)["skipped"] == ["shard shard-00003"]
        apply(instance, result)
        again, _ = tick(instance, layout.store.root, cursor=result.cursor)  # refused once, reported every tick
        assert isinstance(again, SkipReason)
        assert (
            f"shard shard-00003: image_id {taken} appears in manifest shards 'shard-00001' and 'shard-00003'"
            in again.skip_message
        )


def test_a_shard_name_that_cannot_be_a_partition_key_is_skipped(registered):
    layout, _ = registered
    write_shard(layout, "bad|name", pa.table({"image_id": pa.array([20_000], pa.int64()), "uri": ["d.jpg"]}))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, _ = tick(instance, layout.store.root)
        assert (
            isinstance(result, SkipReason)
            and "shard bad|name: shard name 'bad|name' may only use" in result.skip_message
        )


def write_ids(layout, name: str, ids) -> None:
    write_shard(layout, name, pa.table({"image_id": pa.array(list(ids), pa.int64()), "uri": [f"{i}.jpg" for i in ids]}))


def apply(instance: DagsterInstance, result) -> None:
    """What the daemon does with a tick's partition requests."""
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def test_a_tick_with_one_new_shard_reads_that_manifest_and_no_other(registered, monkeypatch):
    layout, _ = registered
    for i in range(20):
        write_ids(layout, f"more-{i:05d}", range(1_000 + 100 * i, 1_050 + 100 * i))
    with instance_for_test() as instance:
        first, context = tick(instance, layout.store.root)
        apply(instance, first)
        assert json.loads(first.cursor)["shards"] == 23
        write_ids(layout, "more-99999", range(90_000, 90_010))
        read = []
        original = Store.read_bytes
        monkeypatch.setattr(Store, "read_bytes", lambda self, path: read.append(path) or original(self, path))
        result, _ = tick(instance, layout.store.root, cursor=context.cursor)
        assert result.dynamic_partitions_requests == [
            AddDynamicPartitionsRequest(partitions_def_name="shard", partition_keys=["more-99999"])
        ]
    manifests = [p for p in read if "/corpus/manifests/" in p]
    assert manifests == [layout.manifest("more-99999")]
    assert not [p for p in read if p.endswith(".npy")]  # its id range overlaps no known shard: no sidecar read


def test_first_deploy_is_spread_over_ticks_by_the_budget(registered):
    layout, _ = registered
    for i in range(3, 50):
        write_ids(layout, f"shard-{i:05d}", range(1_000 * i, 1_000 * i + 5))
    # the budget comes from the settings, through the Definitions' own sensor
    settings = Settings.from_env({"BACKFILL_DISCOVERY_MAX_SHARDS": "20", "BACKFILL_ROOT": layout.store.root})
    sensor = next(s for s in build_definitions(settings).sensors if s.name == "model_registry_sensor")
    names = [f"shard-{i:05d}" for i in range(50)]
    expected = [
        (names[:20], {"versions": [], "shards": 20, "pending": 30, "skipped": []}),
        (names[20:40], {"versions": [], "shards": 40, "pending": 10, "skipped": []}),
        # the version waits until every shard is added, so its first backfill covers them all
        (names[40:], {"versions": ["v1"], "shards": 50, "pending": 0, "skipped": []}),
    ]
    with instance_for_test() as instance:
        cursor = None
        for added, state in expected:
            result, _ = tick(instance, layout.store.root, cursor=cursor, sensor=sensor)
            requests = [AddDynamicPartitionsRequest(partitions_def_name="shard", partition_keys=added)]
            if state["versions"]:
                requests.append(AddDynamicPartitionsRequest(partitions_def_name="model_version", partition_keys=["v1"]))
            assert result.dynamic_partitions_requests == requests
            assert json.loads(result.cursor) == state
            apply(instance, result)
            cursor = result.cursor
        last, _ = tick(instance, layout.store.root, cursor=cursor, sensor=sensor)
        assert isinstance(last, SkipReason) and "no new versions of refcnn or manifest shards" in last.skip_message
