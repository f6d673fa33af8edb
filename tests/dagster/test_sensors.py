"""Sensor and schedule evaluations: exact requests and cursors."""

import io
import json
import re

import pyarrow as pa
import pytest
import torch

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
        assert "skipped: version v2: model version at refcnn/v2: model.json is missing 'version'" in result.skip_message
        assert json.loads(context.cursor)["skipped"] == ["version v2"]


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


def scripted(module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


class NaNModel(torch.nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 16), float("nan"))


class WrongDimModel(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))  # 3 values per image, not the 16 the card promises


@pytest.mark.parametrize(
    "artifact, reason",
    [
        (lambda: scripted(NaNModel()), "returned NaN or inf embeddings"),
        (lambda: scripted(WrongDimModel()), r"returned shape \(2, 3\) .* promises \(2, 16\)"),
        (lambda: b"not a torchscript archive", "not loadable TorchScript"),
    ],
)
def test_a_broken_model_version_is_skipped_and_never_partitioned(registered, artifact, reason):
    layout, _ = registered
    register_version(layout, MODEL, "v2", artifact(), dim=16, input_size=32)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, context = tick(instance, layout.store.root)
        assert isinstance(result, SkipReason)
        assert re.search(f"skipped: version v2: model refcnn version v2.*{reason}", result.skip_message), result.skip_message
        assert json.loads(context.cursor) == {"versions": ["v1"], "shards": 3, "skipped": ["version v2"]}


def test_a_new_shard_repeating_an_image_id_is_refused_before_any_work(registered):
    layout, _ = registered
    taken = int(read_shard(layout, "shard-00001").image_ids[0])
    write_shard(layout, "shard-00003", pa.table({"image_id": pa.array([taken, 10_000], pa.int64()), "uri": ["a.jpg", "b.jpg"]}))
    write_shard(layout, "shard-00004", pa.table({"image_id": pa.array([10_001], pa.int64()), "uri": ["c.jpg"]}))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, _ = tick(instance, layout.store.root)
        assert result.dynamic_partitions_requests == [AddDynamicPartitionsRequest(partitions_def_name="shard", partition_keys=["shard-00004"])]
        assert json.loads(result.cursor)["skipped"] == ["shard shard-00003"]


def test_a_shard_name_that_cannot_be_a_partition_key_is_skipped(registered):
    layout, _ = registered
    write_shard(layout, "bad|name", pa.table({"image_id": pa.array([20_000], pa.int64()), "uri": ["d.jpg"]}))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, _ = tick(instance, layout.store.root)
        assert isinstance(result, SkipReason) and "shard bad|name: shard name 'bad|name' may only use" in result.skip_message
