"""deploy/: every manifest validates against the Kubernetes schema, and the files agree with each other."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ops.pools import DEFAULT_POOLS_FILE, POOL_TAG, POOLS_FILE_ENV, load_pools

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
# top-level keys of the chart's values schema (helm/dagster/schema/.../values.py, dagster 1.13)
CHART_KEYS = {
    "dagsterWebserver", "dagster-user-deployments", "postgresql", "generatePostgresqlPasswordSecret",
    "generateCeleryConfigSecret", "rabbitmq", "redis", "flower", "ingress", "imagePullSecrets",
    "computeLogManager", "scheduler", "runLauncher", "pythonLogs", "dagsterDaemon", "busybox", "migrate",
    "telemetry", "serviceAccount", "global", "retention", "additionalInstanceConfig", "concurrency",
}  # fmt: skip


def values():
    return yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())


def manifest(kind):
    docs = [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == kind]
    assert len(docs) == 1, kind
    return docs[0]


def test_every_manifest_validates_strictly():
    assert {p.name for p in MANIFESTS} >= {"priorityclass.yaml", "serviceaccount.yaml", "pool-configmap.yaml"}
    cli = Path(sys.executable).with_name("kubernetes-validate")
    proc = subprocess.run([str(cli), "--strict", *map(str, MANIFESTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(MANIFESTS), proc.stdout


def test_strict_validation_catches_a_misspelt_field(tmp_path):
    """The validator is live (not a no-op): a misspelt field fails."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((DEPLOY / "k8s" / "priorityclass.yaml").read_text().replace("preemptionPolicy", "preemptPolicy"))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    assert subprocess.run([str(cli), "--strict", "--quiet", str(bad)], capture_output=True).returncode != 0


def test_priority_class_waits_and_still_scales_up():
    pc = manifest("PriorityClass")
    assert pc["preemptionPolicy"] in ("Never", "PreemptLowerPriority")  # enum: not checked by the schema
    assert pc["preemptionPolicy"] == "Never" and pc["globalDefault"] is False
    assert pc["value"] > -10  # cluster-autoscaler ignores pods below --expendable-pods-priority-cutoff=-10
    assert {pool.priority_class for pool in load_pools().pools.values()} == {pc["metadata"]["name"]}


def test_pool_configmap_is_the_pools_file_and_is_mounted_where_the_env_points():
    cm = manifest("ConfigMap")
    assert cm["data"]["pools.yaml"] == DEFAULT_POOLS_FILE.read_text()
    dep = values()["dagster-user-deployments"]["deployments"][0]
    env = {e["name"]: e["value"] for e in dep["env"]}
    volume = next(v for v in dep["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
    mount = next(m for m in dep["volumeMounts"] if m["name"] == volume["name"])
    assert env[POOLS_FILE_ENV] == f"{mount['mountPath']}/pools.yaml"
    assert env["BACKFILL_POOL"] in load_pools().pools


def test_service_account_is_the_one_the_chart_uses_and_has_role_placeholders():
    sa = manifest("ServiceAccount")
    v = values()
    assert (
        v["serviceAccount"] == {"create": False, "name": sa["metadata"]["name"]}
        and v["global"]["serviceAccountName"] == sa["metadata"]["name"]
    )
    assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account", "azure.workload.identity/client-id"} <= set(
        sa["metadata"]["annotations"]
    )


def test_helm_values_use_chart_keys_and_what_the_issue_asks_for():
    v = values()
    assert set(v) <= CHART_KEYS, set(v) - CHART_KEYS
    assert v["runLauncher"]["type"] == "K8sRunLauncher"
    daemon = v["dagsterDaemon"]
    assert daemon["runCoordinator"]["enabled"] and daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert (
        daemon["runMonitoring"]["enabled"]
        and daemon["runRetries"]["enabled"]
        and daemon["runRetries"]["retryOnAssetOrOpFailure"]
    )
    assert v["postgresql"]["postgresqlHost"] and v["postgresql"]["service"]["port"] == 5432
    # per-pool run limits are the pools file's maxConcurrentRuns
    limits = {(t["key"], t["value"]): t["limit"] for t in v["concurrency"]["runs"]["tagConcurrencyLimits"]}
    assert limits == {(POOL_TAG, p.name): p.max_concurrent_runs for p in load_pools().pools.values()}
    # the publish pool of one, as in the local dagster.yaml
    assert v["concurrency"]["pools"]["defaultLimit"] == 1
    env = {e["name"]: e["value"] for e in v["dagster-user-deployments"]["deployments"][0]["env"]}
    assert env["BACKFILL_DEPLOYMENT"] == "k8s" and env["BACKFILL_ROOT"].startswith("s3://")


def test_everything_runs_read_only_and_non_root_with_two_writable_dirs():
    v = values()
    dep = v["dagster-user-deployments"]["deployments"][0]
    assert dep["securityContext"]["readOnlyRootFilesystem"] and dep["podSecurityContext"]["runAsNonRoot"]
    empty = {v_["name"] for v_ in dep["volumes"] if "emptyDir" in v_}
    writable = {m["mountPath"] for m in dep["volumeMounts"] if m["name"] in empty}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    home = re.search(r"DAGSTER_HOME=(\S+)", dockerfile).group(1)
    assert writable == {"/tmp", home}
    run = v["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    assert (
        run["containerConfig"]["securityContext"]["readOnlyRootFilesystem"]
        and run["podSpecConfig"]["securityContext"]["runAsNonRoot"]
    )
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1].split(":")[0] == str(run["podSpecConfig"]["securityContext"]["runAsUser"]) != "0"


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_variants_pin_the_torch_of_setup(variant):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^\s+{variant}\)\s+pip install \"torch==\$\{{TORCH_VERSION\}}\"", dockerfile, re.M)
    setup = (DEPLOY.parent / "scripts" / "setup.sh").read_text()
    assert re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile).group(1) == re.search(r"torch==(\S+)", setup).group(1)


def test_index_steps_get_an_on_demand_pool_sized_for_an_index():
    # without indexPool, faiss_index and search_index step pods get the run launcher's 1 GiB limit
    from ops.deployment import INDEX_OPS, pool_executor_config

    pools = load_pools()
    assert pools.index_pool, "deploy/pools.yaml must set indexPool"
    pool = pools.get(pools.index_pool)
    assert pool.device == "cpu" and not pool.k8s_config()["pod_spec_config"]["tolerations"]  # never on spot nodes
    assert pool.k8s_config()["pod_spec_config"]["node_selector"] == {"backfill.dev/capacity": "on-demand"}
    memory = pool.k8s_config()["container_config"]["resources"]["limits"]["memory"]
    assert memory.endswith("Gi") and int(memory[:-2]) >= 16
    per_step = pool_executor_config({}, pools, {POOL_TAG: "gpu-spot"})["per_step_k8s_config"]
    assert all(per_step[op] == pool.k8s_config() for op in INDEX_OPS)


def test_the_cuda_image_installs_the_torchvision_built_for_its_torch():
    # without torchvision the GPU feed never decodes JPEGs with nvjpeg (backfill/feed.py falls back to PIL)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(
        r"^\s+cuda\)\s+pip install \"torch==\$\{TORCH_VERSION\}\" \"torchvision==\$\{TORCHVISION_VERSION\}\"",
        dockerfile,
        re.M,
    )
    assert not re.search(r"^\s+cpu\)[^\n]*torchvision", dockerfile, re.M)  # it cannot sit beside the CPU torch
    torch = re.search(r"ARG TORCH_VERSION=2\.(\d+)\.(\d+)", dockerfile)
    vision = re.search(r"ARG TORCHVISION_VERSION=0\.(\d+)\.(\d+)", dockerfile)
    assert int(vision.group(1)) == int(torch.group(1)) + 15 and vision.group(2) == torch.group(
        2
    )  # torch 2.13.0 <-> 0.28.0


def test_the_instance_storage_url_the_chart_renders_has_an_installed_driver():
    # the chart renders postgres_db with `scheme` from postgresqlScheme; dagster-postgres builds the URL the
    # same way; SQLAlchemy 2.1 took a bare postgresql:// for psycopg 3, absent from the image: every pod failed
    import sqlalchemy
    from dagster_postgres.utils import get_conn_string

    pg = values()["postgresql"]
    url = get_conn_string(
        "dagster", "secret", "db.internal", pg["postgresqlDatabase"], "5432", scheme=pg["postgresqlScheme"]
    )
    sqlalchemy.create_engine(url)  # resolves the dialect and imports its driver; connects to nothing
