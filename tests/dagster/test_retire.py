"""retire_job (the UI's op) and the registry sensor keep Dagster's partitions bounded."""

from dagster import DeleteDynamicPartitionsRequest, instance_for_test

from assets.resources import BackfillResource
from backfill.retire import retired_versions
from ops.retire import retire_job
from tests.conftest import MODEL
from tests.dagster.test_sensors import tick
from tests.engine.test_retire import three_versions  # noqa: F401  (fixture)


def run_retire(instance, layout, **config):
    return retire_job.execute_in_process(
        run_config={"ops": {"retire_versions": {"config": config}}},
        instance=instance,
        resources={"backfill": BackfillResource(root=layout.store.root)},
    )


def metadata(result):
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in event.event_specific_data.metadata.items()}


def test_retire_job_is_a_dry_run_until_confirmed_then_deletes_partitions(three_versions):  # noqa: F811
    layout, _ = three_versions
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("model_version", ["v1", "v2", "v3"])
        dry = run_retire(instance, layout, keep=0)
        assert dry.success and metadata(dry)["dry_run"] is True and metadata(dry)["retired"] == ["v1"]
        assert instance.get_dynamic_partitions("model_version") == ["v1", "v2", "v3"]
        assert layout.store.exists(layout.embeddings(MODEL, "v1"))

        done = run_retire(instance, layout, keep=0, confirm=True)
        assert done.success and metadata(done)["model_version_partitions"] == 2
        assert instance.get_dynamic_partitions("model_version") == ["v2", "v3"]
        assert not layout.store.exists(layout.embeddings(MODEL, "v1")) and retired_versions(layout, MODEL) == ["v1"]


def test_registry_sensor_deletes_the_partition_of_a_version_retired_from_the_cli(three_versions):  # noqa: F811
    from backfill.retire import plan_retirement, retire

    layout, _ = three_versions
    retire(layout, plan_retirement(layout, MODEL, keep=0))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", ["shard-00000", "shard-00001", "shard-00002"])
        instance.add_dynamic_partitions("model_version", ["v1", "v2", "v3"])
        result, _ = tick(instance, layout.store.root)
        assert result.dynamic_partitions_requests == [
            DeleteDynamicPartitionsRequest(partitions_def_name="model_version", partition_keys=["v1"])
        ]
