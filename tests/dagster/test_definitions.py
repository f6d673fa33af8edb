"""The real Definitions load, every job resolves, and the layout the UI shows is what we promise."""

from dagster import AssetKey, DefaultScheduleStatus, DefaultSensorStatus

from assets.embeddings import EMBED_RETRY_POLICY, image_embeddings
from ops.definitions import defs


def test_every_job_resolves():
    repo = defs.get_repository_def()
    names = {job.name for job in repo.get_all_jobs()}
    assert {"embed_job", "index_job", "retire_job"} <= names
    for name in names - {"retire_job"}:  # retire_job is an op job: no assets
        job = repo.get_job(name)  # resolves the selection against the asset graph, or raises
        assert job.asset_layer.executable_asset_keys, name


def test_assets_checks_and_partitions():
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {"model_version", "image_embeddings", "faiss_index", "search_index"}
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert checks == {
        ("model_version", "verified"),
        ("image_embeddings", "complete"),
        ("image_embeddings", "reject_rate"),
        ("faiss_index", "recall_at_10"),
    }
    # every version is verified before any of its shards is embedded
    assert graph.get(AssetKey("image_embeddings")).parent_keys == {AssetKey("model_version")}
    emb = graph.get(AssetKey("image_embeddings"))
    assert emb.partitions_def.partition_dimension_names == ["model_version", "shard"]
    assert graph.get(AssetKey("faiss_index")).partitions_def.name == "model_version"
    assert graph.get(AssetKey("faiss_index")).parent_keys == {AssetKey("image_embeddings")}


def test_retry_policy_backs_off_with_jitter():
    assert EMBED_RETRY_POLICY.max_retries >= 3
    assert EMBED_RETRY_POLICY.backoff.value == "EXPONENTIAL" and EMBED_RETRY_POLICY.jitter.value == "PLUS_MINUS"
    assert image_embeddings.op.retry_policy == EMBED_RETRY_POLICY


def test_sensors_run_by_default_and_refresh_is_off():
    repo = defs.get_repository_def()
    assert repo.get_sensor_def("model_registry_sensor").default_status == DefaultSensorStatus.RUNNING
    assert repo.get_sensor_def("backfill_automation").default_status == DefaultSensorStatus.RUNNING
    assert repo.get_sensor_def("index_automation").default_status == DefaultSensorStatus.RUNNING
    # model_version runs as a plain run: nothing would verify a new version otherwise
    assert AssetKey("model_version") in repo.get_sensor_def("index_automation").asset_selection.resolve(defs.resolve_asset_graph())
    assert repo.get_schedule_def("refresh_schedule").default_status == DefaultScheduleStatus.STOPPED


def test_publishing_is_serialised_by_a_pool_of_one():
    import yaml

    from assets.index import PUBLISH_POOL, search_index
    from harness.local_instance import REPO

    assert search_index.op.pool == PUBLISH_POOL
    instance = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    assert instance["concurrency"]["pools"]["default_limit"] == 1
    assert instance["run_retries"]["enabled"] and instance["run_monitoring"]["enabled"]


def test_a_malformed_setting_names_the_variable(monkeypatch):
    import pytest

    from ops.definitions import backfill_resource_from_env

    monkeypatch.setenv("BACKFILL_BATCH_SIZE", "abc")
    with pytest.raises(ValueError, match="BACKFILL_BATCH_SIZE='abc' is not a valid int"):
        backfill_resource_from_env()


def test_step_jobs_render_with_backoff_limit_zero():
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    from assets.index import faiss_index, search_index

    config = DagsterK8sJobConfig(job_image="backfill:test", dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance")
    for asset in (image_embeddings, faiss_index, search_index):
        user = get_user_defined_k8s_config(asset.op.tags)
        assert user.job_spec_config == {"backoff_limit": 0}, asset.key
        job = construct_dagster_k8s_job(config, ["dagster", "api", "execute_step"], "dagster-step-test", user)
        assert job.spec.backoff_limit == 0
