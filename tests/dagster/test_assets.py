"""Materialize the assets with partition keys on a test instance: metadata, checks, publish, failures."""

from dagster import AssetKey, DagsterInstance, MultiPartitionKey, instance_for_test, materialize

from assets.embeddings import image_embeddings
from assets.index import faiss_index, search_index
from assets.resources import BackfillResource
from backfill.config import IndexConfig
from backfill.manifest import list_shards
from backfill.publish import read_pointer
from tests.conftest import MODEL


def resources(layout, **overrides):
    return {"backfill": BackfillResource(root=layout.store.root, batch_size=8, chunk_size=8, **overrides)}


def add_partitions(instance: DagsterInstance, layout, version: str = "v1") -> list[str]:
    shards = list_shards(layout)
    instance.add_dynamic_partitions("shard", shards)
    instance.add_dynamic_partitions("model_version", [version])
    return shards


def embed_one(instance: DagsterInstance, layout, shard: str, version: str = "v1", **kwargs):
    return materialize(
        [image_embeddings],
        partition_key=MultiPartitionKey({"model_version": version, "shard": shard}),
        instance=instance,
        resources=resources(layout),
        **kwargs,
    )


def embed_all(instance: DagsterInstance, layout, version: str = "v1"):
    for shard in add_partitions(instance, layout, version):
        assert embed_one(instance, layout, shard, version).success


def latest_metadata(instance, key: str, partition: str):
    event = instance.get_latest_materialization_event(AssetKey(key))
    records = instance.fetch_materializations(AssetKey(key), limit=50).records
    for record in records:
        if record.asset_materialization.partition == partition:
            return {k: v.value for k, v in record.asset_materialization.metadata.items()}
    raise AssertionError(f"no materialization of {key} {partition} (latest: {event})")


def test_embedding_partition_metadata_and_checks(registered):
    layout, _ = registered
    with instance_for_test() as instance:
        add_partitions(instance, layout)
        result = embed_one(instance, layout, "shard-00001")
        meta = latest_metadata(instance, "image_embeddings", "v1|shard-00001")
        assert meta["images"] == 20 and meta["rejects"] == 0 and meta["device"] == "cpu" and meta["batch_size"] == 8
        assert meta["images_per_s"] > 0 and meta["wall_s"] > 0 and meta["chunks"] == 3
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["complete"].passed and checks["complete"].metadata["rows"].value == 20
        assert checks["reject_rate"].passed and checks["reject_rate"].metadata["reject_rate"].value == 0


def test_index_build_then_publish(registered):
    layout, _ = registered
    with instance_for_test() as instance:
        embed_all(instance, layout)
        result = materialize(
            [faiss_index, search_index], partition_key="v1", instance=instance, resources=resources(layout)
        )
        assert result.success
        meta = latest_metadata(instance, "faiss_index", "v1")
        assert (
            meta["vectors"] == 60 and meta["recall_at_10"] == 1.0 and meta["index_type"] == "Flat" and meta["bytes"] > 0
        )
        assert read_pointer(layout, MODEL)["build_id"] == meta["build_id"]
        assert latest_metadata(instance, "search_index", "v1")["published"] is True


def test_failed_recall_gate_blocks_publishing(registered, monkeypatch):
    layout, _ = registered
    # an IVF-PQ index with a target of exact recall: the build succeeds, its blocking check fails
    monkeypatch.setattr(
        BackfillResource,
        "index_config",
        lambda self: IndexConfig(flat_below=10, pq_from=11, pq_m=2, target_recall=1.0, n_queries=20),
    )
    with instance_for_test() as instance:
        embed_all(instance, layout)
        result = materialize(
            [faiss_index, search_index],
            partition_key="v1",
            instance=instance,
            resources=resources(layout),
            raise_on_error=False,
        )
        assert not result.success
        assert latest_metadata(instance, "faiss_index", "v1")["recall_at_10"] < 1.0
        steps = {(e.step_key, e.event_type_value) for e in result.all_events if e.step_key}
        assert ("search_index", "STEP_START") not in steps  # skipped by the blocking check, not failed
        assert read_pointer(layout, MODEL) is None


def test_permanent_error_fails_without_retries(registered):
    layout, _ = registered
    layout.store.write_bytes(f"{layout.model_dir(MODEL, 'v1')}/model.pt", b"tampered")
    with instance_for_test() as instance:
        add_partitions(instance, layout)
        result = embed_one(instance, layout, "shard-00000", raise_on_error=False)
        assert not result.success
        failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert len(failure) == 1 and "sha256" in failure[0].event_specific_data.error.message
        assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        # and the instance's run retries are told not to repeat it
        assert instance.get_run_by_id(result.run_id).tags["dagster/retry_on_asset_or_op_failure"] == "false"


def test_a_write_that_fails_halfway_leaves_nothing_visible_and_is_retried(registered, monkeypatch):
    import errno
    import os

    layout, _ = registered
    real_fsync, failures = os.fsync, []

    def disk_full_once(fd):
        if not failures:
            failures.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_once)
    with instance_for_test() as instance:
        add_partitions(instance, layout)
        result = embed_one(instance, layout, "shard-00000")
    assert result.success and failures
    kinds = [e.event_type_value for e in result.all_events]
    assert "STEP_UP_FOR_RETRY" in kinds  # RetryableError -> the RetryPolicy fired
    out = layout.embeddings(MODEL, "v1", "shard-00000")
    names = layout.store.ls(out)
    assert not [n for n in names if n.endswith(".tmp")]  # the half-written file was removed
    assert len([n for n in names if n.startswith("rows-")]) == 3
