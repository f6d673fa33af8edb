"""The near-line path in Dagster: a new shard is embedded and added to the published index; a newer
version's index waits for it (evaluated with the public automation evaluator and `materialize`)."""

import io

import pyarrow.parquet as pq
from dagster import evaluate_automation_conditions, instance_for_test, materialize

from assets.index import faiss_index, search_index
from backfill.index import IDS_FILE
from backfill.manifest import read_shard, write_shard
from backfill.publish import read_pointer
from ops.definitions import defs as load_defs
from tests.conftest import MODEL, register_tiny
from tests.dagster.test_assets import embed_one, latest_metadata, resources
from tests.dagster.test_automation import requested, verified

defs = load_defs()  # lazy Definitions: built from the environment when called

FIRST, NEW = ["shard-00000", "shard-00001"], "shard-00002"


def hold_back(layout, shard: str):
    """Take a shard's manifest away (its images stay), to land it later as a new arrival."""
    path = layout.manifest(shard)
    table = pq.read_table(path)
    layout.store.rm(path)
    return table


def index_and_publish(instance, layout, version: str):
    return materialize([faiss_index, search_index], partition_key=version, instance=instance, resources=resources(layout), raise_on_error=False)


def test_a_new_shard_is_added_to_the_published_index_without_a_rebuild(registered):
    layout, _ = registered
    table = hold_back(layout, NEW)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", FIRST)
        instance.add_dynamic_partitions("model_version", ["v1"])
        for shard in FIRST:
            assert embed_one(instance, layout, shard).success
        assert index_and_publish(instance, layout, "v1").success
        first = read_pointer(layout, MODEL)
        assert first["vectors"] == 40 and latest_metadata(instance, "faiss_index", "v1")["mode"] == "full"

        write_shard(layout, NEW, table)
        instance.add_dynamic_partitions("shard", [NEW])
        assert embed_one(instance, layout, NEW).success
        assert index_and_publish(instance, layout, "v1").success
        meta = latest_metadata(instance, "faiss_index", "v1")
        assert (meta["mode"], meta["base_build_id"], meta["added_shards"]) == ("incremental", first["build_id"], [NEW])
        pointer = read_pointer(layout, MODEL)
        assert pointer["vectors"] == 60 and pointer["previous_build_id"] == first["build_id"]


def test_a_shard_landing_during_a_newer_backfill_is_in_that_versions_index(registered):
    """v1 serves; v2's backfill is half done when a new shard lands: v2's index must wait for it."""
    layout, _ = registered
    register_tiny(layout, "v2")
    table = hold_back(layout, NEW)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", FIRST)
        instance.add_dynamic_partitions("model_version", ["v1", "v2"])
        verified(instance, "v1", "v2")  # what model_version's runs record
        for shard in FIRST:
            assert embed_one(instance, layout, shard).success
        assert index_and_publish(instance, layout, "v1").success
        cursor = evaluate_automation_conditions(defs=defs, instance=instance).cursor
        assert embed_one(instance, layout, FIRST[0], "v2").success  # v2's backfill is running

        write_shard(layout, NEW, table)
        instance.add_dynamic_partitions("shard", [NEW])  # what the registry sensor does
        tick = evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        assert {"v1|shard-00002", "v2|shard-00002"} <= requested(tick, "image_embeddings")
        assert requested(tick, "faiss_index") == set()

        # v2's last original shard finishes; the new shard is still missing for v2: no index yet
        assert embed_one(instance, layout, FIRST[1], "v2").success
        tick = evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        assert "v2" not in requested(tick, "faiss_index")
        # had the index build started anyway (requested just before the shard landed), it refuses
        early = index_and_publish(instance, layout, "v2")
        assert not early.success and read_pointer(layout, MODEL)["version"] == "v1"
        failure = [e for e in early.all_events if e.event_type_value == "STEP_FAILURE"][0]
        assert f"shard {NEW} has no completion marker" in failure.event_specific_data.error.message

        assert embed_one(instance, layout, NEW, "v2").success
        tick = evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        assert "v2" in requested(tick, "faiss_index")
        assert index_and_publish(instance, layout, "v2").success
        pointer = read_pointer(layout, MODEL)
        assert pointer["version"] == "v2" and pointer["vectors"] == 60
        assert latest_metadata(instance, "faiss_index", "v2")["shards"] == 3
        assert set(read_shard(layout, NEW).image_ids) <= set(_published_ids(layout))


def _published_ids(layout):
    pointer = read_pointer(layout, MODEL)
    path = f"{layout.index_build(MODEL, pointer['build_id'])}/{IDS_FILE}"
    return pq.read_table(io.BytesIO(layout.store.read_bytes(path))).column("image_id").to_pylist()
