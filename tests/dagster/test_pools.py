"""Pools reach step pods: run a real embed run through the pooled k8s executor against a fake Kubernetes API and read the Job it submits."""

from pathlib import Path

import kubernetes
import pytest
from dagster import Definitions, MultiPartitionKey, execute_job, instance_for_test, reconstructable
from dagster_k8s.client import DagsterKubernetesClient

from assets.embeddings import image_embeddings
from assets.index import faiss_index, search_index
from assets.partitions import model_versions, shards
from assets.resources import BackfillResource
from ops.deployment import pooled_k8s_executor
from ops.pools import POOL_TAG, load_pools
from ops.schedules import embed_job

# What the Helm values give run workers (deploy/helm/values.yaml): on-demand nodes. Step
# pods inherit this config from the run launcher; the pool must replace it, not add to it.
RUN_K8S_CONFIG = {
    "pod_spec_config": {
        "node_selector": {"backfill.dev/capacity": "on-demand"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "dagster", "effect": "NoSchedule"}],
    },
    "container_config": {"resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}},
}


def pooled_embed_job():
    """The embed job as the k8s deployment builds it (module level: the run is reconstructed from here)."""
    defs = Definitions(
        assets=[image_embeddings, faiss_index, search_index],
        jobs=[embed_job],
        resources={"backfill": BackfillResource(root="s3://bucket/backfill")},
        executor=pooled_k8s_executor(load_pools(min_grace_s=20)),
    )
    return defs.resolve_job_def("embed_job")


class Submitted(Exception):
    """Raised by the fake API once a Job is recorded: the executor stops the run at once."""


class FakeBatchApi:
    """Records the submitted Job, then fails the submission so the run ends without polling."""

    def __init__(self):
        self.jobs = []

    def create_namespaced_job(self, body, namespace, **kwargs):
        self.jobs.append((namespace, body))
        raise Submitted(body.metadata.name)

    def delete_namespaced_job(self, *args, **kwargs):
        pass


@pytest.fixture
def fake_cluster(monkeypatch):
    batch = FakeBatchApi()
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda *a, **k: None)
    monkeypatch.setattr(
        DagsterKubernetesClient,
        "production_client",
        staticmethod(lambda batch_api_override=None, core_api_override=None: DagsterKubernetesClient(
            batch_api=batch, core_api=object(), logger=lambda *a: None, sleeper=lambda s: None, timer=__import__("time").time
        )),
    )
    return batch


def run_embed(tags):
    """Run embed_job for one partition with `tags` on an instance with a K8sRunLauncher, as in the cluster."""
    launcher = {
        "module": "dagster_k8s",
        "class": "K8sRunLauncher",
        "config": {
            "instance_config_map": "dagster-instance",
            "dagster_home": "/opt/dagster/dagster_home",
            "job_image": "backfill:test",
            "job_namespace": "backfill",
            "service_account_name": "backfill",
            "load_incluster_config": True,
            "run_k8s_config": RUN_K8S_CONFIG,
        },
    }
    with instance_for_test(overrides={"run_launcher": launcher}) as instance:
        instance.add_dynamic_partitions(model_versions.name, ["v1"])
        instance.add_dynamic_partitions(shards.name, ["shard-00000"])
        key = MultiPartitionKey({"model_version": "v1", "shard": "shard-00000"})
        return execute_job(
            reconstructable(pooled_embed_job), instance=instance, tags={"dagster/partition": str(key), **tags}, raise_on_error=False
        )


def submitted_step_job(fake_cluster, tags):
    """The step Job the executor submitted for a run with `tags`, as the Kubernetes API receives it."""
    result = run_embed(tags)
    assert not result.success  # the fake cluster refuses every Job once it has recorded it
    assert len(fake_cluster.jobs) == 1, [event.message for event in result.all_events if event.is_failure]
    namespace, job = fake_cluster.jobs[0]
    assert namespace == "backfill"
    return kubernetes.client.ApiClient().sanitize_for_serialization(job)


def test_pool_tag_places_the_step_pod(fake_cluster):
    job = submitted_step_job(fake_cluster, {POOL_TAG: "gpu-spot"})
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "24Gi", "nvidia.com/gpu": "1"},
        "limits": {"cpu": "8", "memory": "24Gi", "nvidia.com/gpu": "1"},
    }
    # the pool replaced the run worker's on-demand placement instead of adding to it
    assert pod["nodeSelector"] == {"backfill.dev/pool": "gpu-spot"}
    assert [t["key"] for t in pod["tolerations"]] == [
        "backfill.dev/pool", "nvidia.com/gpu", "kubernetes.azure.com/scalesetpriority", "cloud.google.com/gke-spot"
    ]  # fmt: skip
    assert pod["priorityClassName"] == "backfill-batch"
    assert pod["terminationGracePeriodSeconds"] == 60
    assert job["spec"]["backoffLimit"] == 0
    assert pod["serviceAccountName"] == "backfill"
    assert job["metadata"]["labels"]["dagster/op"] == "image_embeddings"


def test_no_pool_tag_uses_the_default_pool(fake_cluster):
    job = submitted_step_job(fake_cluster, {})
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"backfill.dev/pool": "cpu-tidal"}
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert pod["terminationGracePeriodSeconds"] == 120
    assert "podAntiAffinity" in pod["affinity"]


def test_unknown_pool_fails_the_run_naming_the_tag_and_the_pools(fake_cluster):
    result = run_embed({POOL_TAG: "tpu-spot"})
    assert not result.success and fake_cluster.jobs == []
    errors = " ".join(str(e.event_specific_data) for e in result.all_events if e.is_failure or e.event_type_value.endswith("FAILURE"))
    assert "run tag backfill/pool='tpu-spot' is not a pool defined in" in errors and "defined pools: cpu-tidal, gpu-spot" in errors


@pytest.mark.parametrize("pool", ["gpu-spot", "cpu-tidal"])
def test_rendered_step_job_validates_against_the_kubernetes_schema(fake_cluster, pool, tmp_path):
    job = submitted_step_job(fake_cluster, {POOL_TAG: pool})
    assert_valid_k8s(job, tmp_path)
    pod = job["spec"]["template"]["spec"]
    # kubernetes-validate checks types, not enum values: assert those here
    assert pod["restartPolicy"] == "Never"
    for toleration in pod["tolerations"]:
        assert toleration["operator"] in ("Equal", "Exists") and toleration["effect"] in ("NoSchedule", "PreferNoSchedule", "NoExecute")


def test_deep_merge_would_mix_run_and_step_placement():
    """Why pools merge SHALLOW: dagster-k8s's default DEEP merge appends lists and unions dicts.

    Breaks if dagster-k8s changes its merge rules; then revisit Pool.k8s_config.
    """
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    pool = load_pools(min_grace_s=20).get("gpu-spot").k8s_config()
    run = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(RUN_K8S_CONFIG))
    deep = run.merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict({**pool, "merge_behavior": "DEEP"})))
    assert deep.run_k8s_config.pod_spec_config["node_selector"] == {"backfill.dev/capacity": "on-demand", "backfill.dev/pool": "gpu-spot"}
    assert len(deep.run_k8s_config.pod_spec_config["tolerations"]) == 5  # the run worker's one + the pool's four
    shallow = run.merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(pool)))
    assert shallow.run_k8s_config.pod_spec_config["node_selector"] == {"backfill.dev/pool": "gpu-spot"}
    assert len(shallow.run_k8s_config.pod_spec_config["tolerations"]) == 4


def assert_valid_k8s(resource, tmp_path):
    """kubernetes-validate --strict (offline schemas), through its CLI so the test runs what the README says."""
    import subprocess
    import sys

    import yaml

    path = tmp_path / f"{resource['kind']}.yaml"
    path.write_text(yaml.safe_dump(resource))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    proc = subprocess.run([str(cli), "--strict", "--quiet", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
