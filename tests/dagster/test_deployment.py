"""BACKFILL_DEPLOYMENT picks the executor; k8s needs S3 paths; BACKFILL_POOL tags what sensors launch."""

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import yaml
from dagster import in_process_executor, multiprocess_executor

from backfill.config import EmbedConfig
from backfill.errors import ConfigError
from backfill.settings import REPO, Settings
from ops.deployment import DEPLOYMENT_ENV, executor_for
from ops.pools import POOL_ENV, POOL_TAG, pool_tags


def k8s(root: str, grace_s: float = 20) -> Settings:
    return Settings(deployment="k8s", root=root, embed=EmbedConfig(grace_s=grace_s))


def test_local_is_the_default_and_uses_processes():
    assert Settings.from_env({}).deployment == "local"
    assert executor_for(Settings(root="/data")) is multiprocess_executor


def test_local_in_process_runs_steps_in_the_run_worker():
    settings = Settings.from_env({"BACKFILL_DEPLOYMENT": "local-in-process", "BACKFILL_ROOT": "/data"})
    assert executor_for(settings) is in_process_executor


def test_k8s_needs_s3_paths():
    with pytest.raises(
        ConfigError,
        match=r"BACKFILL_DEPLOYMENT=k8s needs BACKFILL_ROOT=s3://bucket/prefix, got '/data': step pods share no disk",
    ):
        executor_for(k8s("/data"))


@pytest.mark.parametrize("root", ["s3://bucket/backfill", "s3a://bucket/backfill"])
def test_k8s_accepts_every_root_the_store_treats_as_s3(root):
    assert executor_for(k8s(root)).name == "k8s"


def test_k8s_uses_the_pooled_k8s_job_executor():
    executor = executor_for(k8s("s3://bucket/backfill"))
    assert executor.name == "k8s" and "default cpu-tidal" in executor.description
    # the run config of k8s_job_executor still applies (job_image, step_k8s_config, ...)
    assert executor.config_schema.config_type.fields.keys() >= {
        "job_image",
        "step_k8s_config",
        "per_step_k8s_config",
        "retries",
    }


def test_k8s_refuses_a_grace_period_that_cannot_commit_a_chunk():
    with pytest.raises(ConfigError, match="terminationGracePeriodSeconds must be an integer of at least 110"):
        executor_for(k8s("s3://bucket/backfill", grace_s=100))


def test_an_unknown_deployment_is_named():
    with pytest.raises(
        ConfigError,
        match=r"environment variable BACKFILL_DEPLOYMENT='cloud' must be one of local, local-in-process, k8s",
    ):
        Settings.from_env({DEPLOYMENT_ENV: "cloud"})


def test_pool_for_sensor_runs():
    pools_file = Settings().pools_file
    assert pool_tags(Settings.from_env({}).pool, pools_file) == {}
    assert pool_tags(Settings.from_env({POOL_ENV: "gpu-spot"}).pool, pools_file) == {POOL_TAG: "gpu-spot"}
    with pytest.raises(ConfigError, match=r"environment variable BACKFILL_POOL='gpu' is not a pool defined in"):
        pool_tags("gpu", pools_file)


def test_the_real_definitions_in_the_k8s_deployment():
    """Load ops.definitions as the cluster does (fresh process: the env is read when Dagster loads defs)."""
    code = (
        "import json; from ops.definitions import defs; repo = defs().get_repository_def();"
        "job = repo.get_job('embed_job');"
        "auto = repo.get_sensor_def('backfill_automation'); index = repo.get_sensor_def('index_automation');"
        "print(json.dumps({'executor': job.executor_def.name, 'tags': dict(auto.run_tags), "
        "'index_tags': dict(index.run_tags)}))"
    )
    env = {**os.environ, DEPLOYMENT_ENV: "k8s", "BACKFILL_ROOT": "s3://bucket/backfill", POOL_ENV: "gpu-spot"}
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {
        "executor": "k8s",
        "tags": {"dagster/retry_strategy": "ALL_STEPS", POOL_TAG: "gpu-spot"},
        # index runs are not counted against the embedding pool's run limit, and jump its queue
        "index_tags": {"dagster/retry_strategy": "ALL_STEPS", "dagster/priority": "10"},
    }


def test_the_index_priority_tag_is_the_one_the_run_queue_reads():
    # Dagster names it only in a private module: this breaks if Dagster renames the tag
    from dagster._core.storage.tags import PRIORITY_TAG

    from ops.sensors import INDEX_PRIORITY, INDEX_PRIORITY_TAG

    assert INDEX_PRIORITY_TAG == PRIORITY_TAG and int(INDEX_PRIORITY) > 0


def test_only_runs_with_an_embedding_step_are_tagged_with_the_default_pool():
    # an index run tagged with the default pool took one of that pool's run slots while it ran
    from ops.deployment import runs_on_pool

    assert runs_on_pool(["image_embeddings"])
    assert not runs_on_pool(["faiss_index", "search_index"])


def _yaml(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def test_postgres_variant_and_helm_values_name_the_same_driver():
    """What the e2e loop and chaos round run on (dagster-postgres.yaml) is what the chart is given."""
    pg = _yaml("dagster_home/dagster-postgres.yaml")["storage"]["postgres"]["postgres_db"]
    helm = _yaml("deploy/helm/values.yaml")["postgresql"]
    assert pg["scheme"] == helm["postgresqlScheme"] == "postgresql+psycopg2"
    assert {v["env"] for v in pg.values() if isinstance(v, dict)} == {
        "DAGSTER_PG_HOST",
        "DAGSTER_PG_PORT",
        "DAGSTER_PG_USERNAME",
        "DAGSTER_PG_PASSWORD",
        "DAGSTER_PG_DB",
    }


def test_the_daemon_stops_in_its_grace_period_and_a_crash_is_recovered_quickly():
    local = _yaml("dagster_home/dagster.yaml")
    # the default launcher has no run-worker health check: run monitoring would never fail a run lost in a crash
    assert local["run_launcher"] == {"module": "ops.local_run_launcher", "class": "LocalRunLauncher"}
    monitoring = local["run_monitoring"]
    assert monitoring["enabled"] and monitoring["max_resume_run_attempts"] == 0  # it cannot resume; retries relaunch
    # a run lost in a crash is failed, then retried, well within the 2 minutes a restart may cost
    assert monitoring["start_timeout_seconds"] + monitoring["poll_interval_seconds"] <= 90
    # in the cluster a sensor call ends before the daemon's 30 s wait per thread and the pod's 30 s grace,
    # and after the registry sensor's own budget
    timeout = int(_yaml("deploy/helm/values.yaml")["dagsterDaemon"]["env"]["DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS"])
    assert Settings().discovery.max_seconds < timeout < 30


def test_a_dequeue_that_cannot_reach_the_code_server_is_retried_before_the_run_fails():
    from dagster import instance_for_test

    local = _yaml("dagster_home/dagster.yaml")
    assert local["run_coordinator"]["config"]["max_user_code_failure_retries"] >= 1  # Dagster's default 0 fails it
    # the shipped file as an instance: Dagster reads the retries with the concurrency block's run limits
    overrides = {"run_coordinator": local["run_coordinator"], "concurrency": local["concurrency"]}
    with instance_for_test(overrides=overrides) as instance:
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_user_code_failure_retries == 6 and queue.user_code_failure_retry_delay == 15
        # the tries outlast the daemon's workspace reload (when it notices a dead code server; private in
        # dagster 1.13, so read here: if Dagster changes it, this says so) and stay within the 2 minutes a
        # restart may cost
        from dagster._daemon.controller import RELOAD_WORKSPACE_INTERVAL

        tries_s = queue.max_user_code_failure_retries * queue.user_code_failure_retry_delay
        assert RELOAD_WORKSPACE_INTERVAL + 20 <= tries_s <= 120


def test_a_pool_slot_left_by_a_killed_publish_step_is_freed_once_its_run_ended(monkeypatch):
    """A step SIGKILLed while it holds the index_publish slot never frees it: every later publish would wait for
    ever (a chaos round, 2026-12-02). The shipped run monitoring frees it after the run ended."""
    from types import SimpleNamespace

    from dagster import DagsterRunStatus, instance_for_test
    from dagster._core.test_utils import create_run_for_test
    from dagster._daemon.monitoring import concurrency
    from dagster._time import get_current_datetime

    local = _yaml("dagster_home/dagster.yaml")
    overrides = {"run_monitoring": local["run_monitoring"], "concurrency": local["concurrency"]}
    with instance_for_test(overrides=overrides) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("index_publish", 1)
        run = create_run_for_test(instance, job_name="__ASSET_JOB", status=DagsterRunStatus.STARTED)
        assert storage.claim_concurrency_slot("index_publish", run.run_id, "search_index").is_claimed
        instance.report_run_failed(run)  # its worker died with the step: nobody frees the slot
        assert storage.get_concurrency_info("index_publish").active_slot_count == 1
        after_s = local["run_monitoring"].get("free_slots_after_run_end_seconds", 0) + 1
        later = get_current_datetime() + timedelta(seconds=after_s)
        monkeypatch.setattr(concurrency, "get_current_datetime", lambda: later)
        list(concurrency.execute_concurrency_slots_iteration(SimpleNamespace(instance=instance), logging.getLogger()))
        assert storage.get_concurrency_info("index_publish").active_slot_count == 0
