"""Pools reach step pods: run a real embed run through the pooled k8s executor against a fake Kubernetes API and read the Job it submits."""

from pathlib import Path

import kubernetes
import pytest
from dagster import Definitions, MultiPartitionKey, execute_job, instance_for_test, reconstructable
from dagster_k8s.client import DagsterKubernetesClient

from assets.embeddings import image_embeddings
from assets.index import faiss_index, search_index
from assets.partitions import model_versions, shards
from ops.pools import POOL_TAG, load_pools
from assets.resources import BackfillResource
from ops.deployment import pooled_k8s_executor
from ops.schedules import embed_job

HELM_VALUES = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "values.yaml"


def helm_launcher():
    import yaml

    return yaml.safe_load(HELM_VALUES.read_text())["runLauncher"]["config"]["k8sRunLauncher"]


def helm_run_k8s_config():
    """runK8sConfig of deploy/helm/values.yaml as the chart hands it to K8sRunLauncher (run_k8s_config)."""
    raw = helm_launcher()["runK8sConfig"]
    snake = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config", "podTemplateSpecMetadata": "pod_template_spec_metadata",
             "jobSpecConfig": "job_spec_config", "jobMetadata": "job_metadata"}  # fmt: skip
    return {snake[k]: v for k, v in raw.items()}


# A run worker placement with a toleration of its own: shows what DEEP merging would do to steps.
RUN_K8S_CONFIG = {
    "pod_spec_config": {
        "node_selector": {"backfill.dev/capacity": "on-demand"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "dagster", "effect": "NoSchedule"}],
    },
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


class FakeCoreApi:
    def list_namespaced_pod(self, *args, **kwargs):
        return kubernetes.client.V1PodList(items=[])


@pytest.fixture
def fake_cluster(monkeypatch):
    batch = FakeBatchApi()
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda *a, **k: None)
    monkeypatch.setattr(
        DagsterKubernetesClient,
        "production_client",
        staticmethod(lambda batch_api_override=None, core_api_override=None: DagsterKubernetesClient(
            batch_api=batch, core_api=FakeCoreApi(), logger=lambda *a: None, sleeper=lambda s: None, timer=__import__("time").time
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
            "run_k8s_config": helm_run_k8s_config(),  # run workers on on-demand nodes, as deployed
            "volumes": helm_launcher()["volumes"],
            "volume_mounts": helm_launcher()["volumeMounts"],
        },
    }
    with instance_for_test(overrides={"run_launcher": launcher}) as instance:
        instance.add_dynamic_partitions(model_versions.name, ["v1"])
        instance.add_dynamic_partitions(shards.name, ["shard-00000"])
        key = MultiPartitionKey({"model_version": "v1", "shard": "shard-00000"})
        result = execute_job(
            reconstructable(pooled_embed_job), instance=instance, tags={"dagster/partition": str(key), **tags}, raise_on_error=False
        )
        result.run_tags = instance.get_run_by_id(result.run_id).tags
        return result


def submitted_step_job(fake_cluster, tags, run_tags=None):
    """The step Job the executor submitted for a run with `tags`, as the Kubernetes API receives it."""
    result = run_embed(tags)
    if run_tags is not None:
        run_tags.update(result.run_tags)
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
    # what the pool does not set comes from the run launcher: the read-only, non-root security context
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"] is True
    assert job["metadata"]["labels"]["dagster/op"] == "image_embeddings"


def test_no_pool_tag_uses_the_default_pool_and_tags_the_run_with_it(fake_cluster):
    run_tags = {}
    job = submitted_step_job(fake_cluster, {}, run_tags)
    assert run_tags[POOL_TAG] == "cpu-tidal"  # the step pod reads it for its device
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"backfill.dev/pool": "cpu-tidal"}
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert pod["terminationGracePeriodSeconds"] == 120
    assert "podAntiAffinity" in pod["affinity"]
    # the anti-affinity spreads pods with this label, which dagster-k8s puts on every step pod
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "step_worker"
    # a read-only root with two writable emptyDirs, and the pools file where BACKFILL_POOLS_FILE points
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts["/opt/dagster/dagster_home"]]
    assert volumes[mounts["/etc/backfill"]]["configMap"]["name"] == "backfill-pools"


def test_run_level_k8s_config_tags_do_not_reach_step_pods(fake_cluster):
    """Why the pool is applied by the executor: dagster-k8s 0.29 builds step pods with
    include_run_tags=False, so a `dagster-k8s/config` tag on the run (or backfill) is ignored.
    Breaks if dagster-k8s starts honouring it; a plain tag could then replace the executor."""
    import json

    # a field no pool sets, so only the run tag could put it there
    tag = {"dagster-k8s/config": json.dumps({"pod_spec_config": {"scheduler_name": "from-run-tag"}})}
    pod = submitted_step_job(fake_cluster, {POOL_TAG: "gpu-spot", **tag})["spec"]["template"]["spec"]
    assert "schedulerName" not in pod


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


def test_gpu_pool_without_cuda_fails_for_good_naming_pool_and_fix(registered, monkeypatch):
    import torch
    from dagster import materialize

    from tests.dagster.test_assets import add_partitions, resources

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine; also on a GPU host
    layout, _ = registered
    with instance_for_test() as instance:
        shard = add_partitions(instance, layout)[0]
        key = MultiPartitionKey({"model_version": "v1", "shard": shard})
        result = materialize(
            [image_embeddings], partition_key=key, instance=instance, resources=resources(layout), tags={POOL_TAG: "gpu-spot"}, raise_on_error=False
        )
        assert not result.success
        failure = result.failure_data_for_node("image_embeddings")
        text = failure.error.message if failure.error else ""
        text += " ".join(str(e.event_specific_data) for e in result.all_events if e.is_step_failure)
        assert "pool 'gpu-spot' runs its steps on cuda, but CUDA is not available" in text
        assert "VARIANT=cuda" in text and "backfill/pool=<a cpu pool>" in text
        # permanent: no step retry and no run retry would change the pod
        assert not any(e.is_step_up_for_retry for e in result.all_events)
        assert instance.get_run_by_id(result.run_id).tags["dagster/retry_on_asset_or_op_failure"] == "false"
        # and nothing was written on the CPU
        assert layout.store.ls(layout.embeddings("refcnn", "v1", shard)) == []


def test_cpu_pool_runs_on_cpu(registered):
    from dagster import materialize

    from tests.dagster.test_assets import add_partitions, latest_metadata, resources

    layout, _ = registered
    with instance_for_test() as instance:
        shard = add_partitions(instance, layout)[0]
        key = MultiPartitionKey({"model_version": "v1", "shard": shard})
        assert materialize([image_embeddings], partition_key=key, instance=instance, resources=resources(layout), tags={POOL_TAG: "cpu-tidal"}).success
        assert latest_metadata(instance, "image_embeddings", str(key))["device"] == "cpu"


def _pools_yaml(**changes):
    import copy

    import yaml

    from ops.pools import DEFAULT_POOLS_FILE

    data = yaml.safe_load(DEFAULT_POOLS_FILE.read_text())
    pool = copy.deepcopy(data["pools"]["gpu-spot"])
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = pool
        for p in parents:
            node = node[p]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    data["pools"]["gpu-spot"] = pool
    return data


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"device": "tpu"}, "pool 'gpu-spot': device must be one of ('cpu', 'cuda'), got 'tpu'"),
        ({"resources__limits": {"cpu": "8", "memory": "24Gi"}}, "device 'cuda' needs resources.limits.nvidia.com/gpu of at least 1"),
        ({"resources__limits__memory": None}, "resources.limits.memory is required"),
        ({"resources__limits__cpu": "eight"}, "resources.limits.cpu must be a Kubernetes quantity such as '4', '500m' or '16Gi', got 'eight'"),
        ({"resources__requests__memory": "32Gi"}, "resources.requests.memory=32Gi is more than resources.limits.memory=24Gi"),
        ({"tolerations": [{"key": "k", "operator": "Equals", "value": "v", "effect": "NoSchedule"}]}, "tolerations[0].operator must be one of ('Equal', 'Exists'), got 'Equals'"),
        ({"tolerations": [{"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedul"}]}, "tolerations[0].effect must be one of"),
        ({"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}, "tolerations[0]: operator Exists must not have a value"),
        ({"nodeSelector": {"cloud.google.com/gke-spot": True}}, "nodeSelector must map label names to string values (quote 'true')"),
        ({"terminationGracePeriodSeconds": 25}, "terminationGracePeriodSeconds must be an integer of at least 30 (BACKFILL_GRACE_S=20"),
        ({"priorityClassName": None}, "pool 'gpu-spot': is missing 'priorityClassName'"),
        ({"maxConcurrentRuns": 0}, "maxConcurrentRuns must be a positive integer, got 0"),
        ({"nodeSelectr": {}}, "unknown keys ['nodeSelectr']"),
        ({"tolerations": [{"key": "k", "operater": "Equal"}]}, "tolerations[0]: unknown keys ['operater']"),
        ({"tolerations": [{"key": "k", "value": "v", "tolerationSeconds": 5}]}, "tolerations[0]: tolerationSeconds only applies to effect NoExecute"),
        ({"tolerations": [{"value": "v"}]}, "tolerations[0]: operator Equal needs a key"),
        ({"tolerations": {"key": "k"}}, "tolerations must be a list, got {'key': 'k'}"),
        ({"affinity": {"nodeAfinity": {}}}, "affinity must be a Kubernetes Affinity mapping"),
        ({"resources__limits__nvidia.com/gpu": "2"}, "resources.requests.nvidia.com/gpu must equal resources.limits.nvidia.com/gpu"),
        ({"resources__request": {}}, "resources: unknown keys ['request']"),
        ({"priorityClassName": ""}, "priorityClassName must be a non-empty string, got ''"),
    ],
)
def test_a_bad_pool_is_refused_naming_file_pool_and_field(changes, message):
    from ops.pools import parse_pools
    from backfill.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_pools(_pools_yaml(**changes), "pools.yaml", min_grace_s=20)
    assert str(err.value).startswith("pools file pools.yaml: ") and message in str(err.value)


def test_cpu_pool_must_not_take_a_gpu_and_default_must_exist():
    from ops.pools import parse_pools
    from backfill.errors import ConfigError

    data = _pools_yaml(device="cpu")
    with pytest.raises(ConfigError, match="device 'cpu' must not ask for nvidia.com/gpu"):
        parse_pools(data, "pools.yaml")
    data = _pools_yaml()
    data["default"] = "gpu"
    with pytest.raises(ConfigError, match=r"'default' must name one of the pools \['cpu-tidal', 'gpu-spot', 'index'\], got 'gpu'"):
        parse_pools(data, "pools.yaml")


def test_a_pool_name_must_be_a_dns_label():
    from backfill.errors import ConfigError
    from ops.pools import parse_pools

    data = _pools_yaml()
    data["pools"]["GPU_spot"] = data["pools"].pop("gpu-spot")
    with pytest.raises(ConfigError, match=r"pools file pools.yaml: pool name 'GPU_spot' must be a lowercase DNS label"):
        parse_pools(data, "pools.yaml")


def test_pools_file_from_the_environment(monkeypatch, tmp_path):
    from ops.pools import POOLS_FILE_ENV, load_pools
    from backfill.errors import ConfigError

    monkeypatch.setenv(POOLS_FILE_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=f"pools file {tmp_path / 'missing.yaml'} does not exist"):
        load_pools()
    (tmp_path / "bad.yaml").write_text("pools: [\n")
    monkeypatch.setenv(POOLS_FILE_ENV, str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_pools()
