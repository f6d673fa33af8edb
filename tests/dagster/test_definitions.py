"""The real Definitions load, every job resolves, and the layout the UI shows is what we promise."""

from dagster import AssetKey, DefaultScheduleStatus, DefaultSensorStatus

from assets.embeddings import EMBED_RETRY_POLICY, image_embeddings
from ops.definitions import defs as load_defs

defs = load_defs()  # lazy Definitions: built from the environment when called


def test_every_job_resolves():
    repo = defs.get_repository_def()
    names = {job.name for job in repo.get_all_jobs()}
    assert {"embed_job", "index_job", "retire_job"} <= names
    for name in names - {"retire_job"}:  # retire_job is an op job: no assets
        job = repo.get_job(name)  # resolves the selection against the asset graph, or raises
        assert job.asset_layer.executable_asset_keys, name


def test_assets_checks_and_partitions():
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        "model_version",
        "image_embeddings",
        "faiss_index",
        "search_index",
        "backfill_plan",
        "backfill_report",
    }
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
    assert AssetKey("model_version") in repo.get_sensor_def("index_automation").asset_selection.resolve(
        defs.resolve_asset_graph()
    )
    assert repo.get_schedule_def("refresh_schedule").default_status == DefaultScheduleStatus.STOPPED


def test_publishing_is_serialised_by_a_pool_of_one():
    import yaml

    from assets.index import PUBLISH_POOL, search_index
    from harness.local_instance import REPO

    assert search_index.op.pool == PUBLISH_POOL
    instance = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    assert instance["concurrency"]["pools"]["default_limit"] == 1
    assert instance["run_retries"]["enabled"] and instance["run_monitoring"]["enabled"]


def test_a_malformed_setting_names_the_variable_when_the_definitions_load(monkeypatch):
    import pytest

    from backfill.errors import ConfigError

    monkeypatch.setenv("BACKFILL_BATCH_SIZE", "abc")
    with pytest.raises(ConfigError, match="BACKFILL_BATCH_SIZE='abc' is not an integer: set a valid value or unset it"):
        load_defs()


def test_importing_the_definitions_reads_no_environment():
    """A bad value fails when Dagster loads the code location, not when a module imports ours."""
    import os
    import subprocess
    import sys

    from backfill.settings import REPO

    code = (
        "import ops.definitions, ops.sensors, ops.schedules, ops.deployment, ops.pools, assets.embeddings; "
        "print('imported');"
        "ops.definitions.defs()"
    )
    env = {**os.environ, "BACKFILL_SENSOR_INTERVAL": "soon"}  # ops/sensors.py read it at import before
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip().splitlines()[-1] == "imported", proc.stderr[-2000:]
    assert (
        proc.returncode != 0 and "environment variable BACKFILL_SENSOR_INTERVAL='soon' is not an integer" in proc.stderr
    )


def test_a_local_deployment_imports_neither_dagster_k8s_nor_torch():
    """Every local process (code servers, run and step workers) would pay ~1 s for the kubernetes client, and
    every one (the sensors' code server included) ~2 s and its memory for torch: only the steps that embed or
    load a model import it."""
    import os
    import subprocess
    import sys

    from backfill.settings import REPO

    code = (
        "import sys, ops.definitions; ops.definitions.defs(); "
        "print(sorted(m for m in sys.modules if m.startswith(('dagster_k8s', 'kubernetes', 'torch'))))"
    )
    env = {**os.environ, "BACKFILL_DEPLOYMENT": "local"}
    proc = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_sensor_intervals_cron_and_resource_come_from_settings():
    from assets.resources import BackfillResource
    from backfill.config import EmbedConfig, IndexConfig
    from backfill.settings import Settings
    from ops.definitions import build_definitions

    settings = Settings(
        root="/data", sensor_interval_s=5, automation_interval_s=7, refresh_cron="*/5 * * * *",
        embed=EmbedConfig(batch_size=16, prefetch_batches=5), index=IndexConfig(pq_m=8),
    )  # fmt: skip
    repo = build_definitions(settings).get_repository_def()
    assert repo.get_sensor_def("model_registry_sensor").minimum_interval_seconds == 5
    assert repo.get_sensor_def("backfill_automation").minimum_interval_seconds == 7
    assert repo.get_sensor_def("index_automation").minimum_interval_seconds == 7
    assert repo.get_schedule_def("refresh_schedule").cron_schedule == "*/5 * * * *"
    resource = BackfillResource.from_settings(settings)
    assert resource.embed_config() == settings.embed and resource.index_config() == settings.index


def test_the_resource_has_every_engine_setting_with_its_default():
    """Every EmbedConfig and IndexConfig field can be set in Dagster, and its default is the dataclass's."""
    import dataclasses

    from assets.resources import BackfillResource
    from backfill.config import EmbedConfig, IndexConfig

    fields = BackfillResource.model_fields
    for config in (EmbedConfig, IndexConfig):
        for field in dataclasses.fields(config):
            assert field.name in fields, f"BackfillResource needs a field {field.name} (from {config.__name__})"
            assert fields[field.name].default == field.default, field.name
    resource = BackfillResource(root="/data")
    assert resource.embed_config() == EmbedConfig() and resource.index_config() == IndexConfig()


def test_step_jobs_render_with_backoff_limit_zero():
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    from assets.index import faiss_index, search_index

    config = DagsterK8sJobConfig(
        job_image="backfill:test", dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance"
    )
    # faiss_index is a graph of steps: every op of it is a step Job
    ops = [
        op_def for asset in (image_embeddings, faiss_index, search_index) for op_def in asset.node_def.iterate_op_defs()
    ]
    assert len(ops) == 5
    for op_def in ops:
        user = get_user_defined_k8s_config(op_def.tags)
        assert user.job_spec_config == {"backoff_limit": 0}, op_def.name
        job = construct_dagster_k8s_job(config, ["dagster", "api", "execute_step"], "dagster-step-test", user)
        assert job.spec.backoff_limit == 0
