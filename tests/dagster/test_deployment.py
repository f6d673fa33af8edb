"""BACKFILL_DEPLOYMENT picks the executor; k8s needs S3 paths; BACKFILL_POOL tags what sensors launch."""

import json
import os
import subprocess
import sys

import pytest
from dagster import multiprocess_executor

from assets.pools import POOL_ENV, POOL_TAG, pool_tags_from_env
from backfill.errors import ConfigError
from harness.local_instance import REPO
from ops.deployment import DEPLOYMENT_ENV, executor_from_env


def test_local_is_the_default_and_uses_processes(monkeypatch):
    monkeypatch.delenv(DEPLOYMENT_ENV, raising=False)
    assert executor_from_env("/data", 20) is multiprocess_executor


def test_k8s_needs_s3_paths(monkeypatch):
    monkeypatch.setenv(DEPLOYMENT_ENV, "k8s")
    with pytest.raises(ConfigError, match=r"BACKFILL_DEPLOYMENT=k8s needs BACKFILL_ROOT=s3://bucket/prefix, got '/data': step pods share no disk"):
        executor_from_env("/data", 20)


@pytest.mark.parametrize("root", ["s3://bucket/backfill", "s3a://bucket/backfill"])
def test_k8s_accepts_every_root_the_store_treats_as_s3(monkeypatch, root):
    monkeypatch.setenv(DEPLOYMENT_ENV, "k8s")
    assert executor_from_env(root, 20).name == "k8s"


def test_k8s_uses_the_pooled_k8s_job_executor(monkeypatch):
    monkeypatch.setenv(DEPLOYMENT_ENV, "k8s")
    executor = executor_from_env("s3://bucket/backfill", 20)
    assert executor.name == "k8s" and "default cpu-tidal" in executor.description
    # the run config of k8s_job_executor still applies (job_image, step_k8s_config, ...)
    assert executor.config_schema.config_type.fields.keys() >= {"job_image", "step_k8s_config", "per_step_k8s_config", "retries"}


def test_k8s_refuses_a_grace_period_that_cannot_commit_a_chunk(monkeypatch):
    monkeypatch.setenv(DEPLOYMENT_ENV, "k8s")
    with pytest.raises(ConfigError, match="terminationGracePeriodSeconds must be an integer of at least 110"):
        executor_from_env("s3://bucket/backfill", 100)


def test_an_unknown_deployment_is_named(monkeypatch):
    monkeypatch.setenv(DEPLOYMENT_ENV, "cloud")
    with pytest.raises(ConfigError, match=r"environment variable BACKFILL_DEPLOYMENT='cloud' must be one of local, k8s"):
        executor_from_env("/data", 20)


def test_pool_for_sensor_runs(monkeypatch):
    monkeypatch.delenv(POOL_ENV, raising=False)
    assert pool_tags_from_env() == {}
    monkeypatch.setenv(POOL_ENV, "gpu-spot")
    assert pool_tags_from_env() == {POOL_TAG: "gpu-spot"}
    monkeypatch.setenv(POOL_ENV, "gpu")
    with pytest.raises(ConfigError, match=r"environment variable BACKFILL_POOL='gpu' is not a pool defined in"):
        pool_tags_from_env()


def test_the_real_definitions_in_the_k8s_deployment():
    """Load ops.definitions as the cluster does (fresh process: the env is read at import)."""
    code = (
        "import json; from ops.definitions import defs; repo = defs.get_repository_def();"
        "job = repo.get_job('embed_job');"
        "auto = repo.get_sensor_def('backfill_automation'); index = repo.get_sensor_def('index_automation');"
        "print(json.dumps({'executor': job.executor_def.name, 'tags': dict(auto.run_tags), 'index_tags': dict(index.run_tags)}))"
    )
    env = {**os.environ, DEPLOYMENT_ENV: "k8s", "BACKFILL_ROOT": "s3://bucket/backfill", POOL_ENV: "gpu-spot"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
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
