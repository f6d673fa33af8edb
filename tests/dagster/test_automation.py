"""What the backfill_automation sensor will request, evaluated with Dagster's public evaluator.

These tests pin the declarative-automation behaviour the product relies on: a new
version is verified first (model_version), then its partitions are requested together
(emitted as one backfill), and the index is requested only once every shard of that
version is materialized. If a Dagster upgrade changes any of it, these fail.
"""

from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    MultiPartitionKey,
    evaluate_automation_conditions,
    instance_for_test,
    materialize,
)

from assets.embeddings import image_embeddings
from assets.models import model_version
from ops.definitions import defs as load_defs
from tests.dagster.test_assets import resources

defs = load_defs()  # lazy Definitions: built from the environment when called

SHARDS = ["shard-00000", "shard-00001", "shard-00002"]


def requested(result, key: str) -> set[str]:
    for r in result.results:
        if r.key == AssetKey(key):
            return set(r.true_subset.expensively_compute_partition_keys())
    raise AssertionError(key)


def verified(instance: DagsterInstance, *versions: str) -> None:
    """What a successful model_version run records (the asset itself is tested in test_models.py)."""
    for version in versions:
        instance.report_runless_asset_event(AssetMaterialization("model_version", partition=version))


def test_a_new_version_is_verified_then_requests_all_its_shards_in_one_tick():
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        first = evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0  # no version yet: nothing to embed
        instance.add_dynamic_partitions("model_version", ["v1"])
        second = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert requested(second, "model_version") == {"v1"}
        assert requested(second, "image_embeddings") == set()  # waits for the verification
        verified(instance, "v1")
        third = evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
        assert requested(third, "image_embeddings") == {f"v1|{s}" for s in SHARDS}
        assert requested(third, "model_version") == set()
        assert requested(third, "faiss_index") == set()  # waits for its shards
        fourth = evaluate_automation_conditions(defs=defs, instance=instance, cursor=third.cursor)
        assert fourth.total_requested == 0  # requested once, not again every tick


def test_partitions_added_before_the_first_evaluation_are_requested_once():
    # a fresh deployment: the registry sensor adds v1 before the automation sensor's first
    # tick (on_missing() counts that tick as "handled" and never embedded them)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        first = evaluate_automation_conditions(defs=defs, instance=instance)
        assert requested(first, "model_version") == {"v1"}
        verified(instance, "v1")
        second = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert requested(second, "image_embeddings") == {f"v1|{s}" for s in SHARDS}
        third = evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
        assert third.total_requested == 0


def test_index_is_requested_when_every_shard_of_the_version_is_done(registered):
    layout, _ = registered
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        verified(instance, "v1")
        cursor = evaluate_automation_conditions(defs=defs, instance=instance).cursor
        for i, shard in enumerate(SHARDS):
            materialize(
                [image_embeddings],
                partition_key=MultiPartitionKey({"model_version": "v1", "shard": shard}),
                instance=instance,
                resources=resources(layout),
            )
            result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
            cursor = result.cursor
            expected = {"v1"} if i == len(SHARDS) - 1 else set()
            assert requested(result, "faiss_index") == expected, f"after {i + 1} shards"


def test_a_new_shard_is_embedded_for_every_known_version():
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1", "v2"])
        verified(instance, "v1", "v2")
        cursor = evaluate_automation_conditions(defs=defs, instance=instance).cursor
        instance.add_dynamic_partitions("shard", ["shard-00003"])
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        assert requested(result, "image_embeddings") == {"v1|shard-00003", "v2|shard-00003"}


def test_a_version_that_fails_verification_never_gets_its_shards_embedded(registered):
    layout, _ = registered
    layout.store.write_bytes(f"{layout.model_dir('refcnn', 'v1')}/model.pt", b"tampered")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", SHARDS)
        instance.add_dynamic_partitions("model_version", ["v1"])
        cursor = evaluate_automation_conditions(defs=defs, instance=instance).cursor
        run = materialize([model_version], partition_key="v1", instance=instance, resources=resources(layout), raise_on_error=False)
        assert not run.success
        for _ in range(2):  # neither right after the failure nor on a later tick
            result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
            cursor = result.cursor
            assert result.total_requested == 0
