"""The Definitions still load after sensor and schedule evaluations from test instances (keep these two in order)."""

import datetime

from dagster import SensorResult, instance_for_test

from ops.definitions import defs as load_defs
from tests.conftest import MODEL, register_tiny
from tests.dagster.test_sensors import refresh, tick


def test_a_tick_and_a_refresh_evaluated_from_a_test_instance(layout):
    register_tiny(layout, "v1")
    layout.store.write_json(layout.pointer(MODEL), {"version": "v1", "build_id": "v1-x"})
    with instance_for_test() as instance:
        result, _ = tick(instance, layout.store.root)
        assert isinstance(result, SensorResult)
        instance.add_dynamic_partitions("shard", ["shard-00000"])
        when = datetime.datetime(2026, 11, 29, 3, 0, tzinfo=datetime.timezone.utc)
        assert [r.run_key for r in refresh(instance, layout.store.root, when)] == [
            "refresh-v1-shard-00000-20261129T0300"
        ]


def test_then_the_definitions_still_load():
    # failed with "Attempted to resolve undefined DagsterInstance weakref" while the helpers above left their
    # contexts to garbage collection (see tests/dagster/test_sensors.py)
    repo = load_defs().get_repository_def()
    assert "embed_job" in {job.name for job in repo.get_all_jobs()}
