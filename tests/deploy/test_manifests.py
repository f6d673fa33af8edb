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
    # the QueuedRunCoordinator, as a custom coordinator: the chart's queued block has no key for the dequeue retries
    coordinator = daemon["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "CustomRunCoordinator"
    assert coordinator["config"]["customRunCoordinator"]["class"] == "QueuedRunCoordinator"
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
    # every op of the index assets is placed (dagster-k8s matches per_step_k8s_config by op name): failed
    # when faiss_index became a graph of steps and INDEX_OPS still named the asset
    from assets.index import faiss_index, search_index

    ops = {op.name for asset in (faiss_index, search_index) for op in asset.node_def.iterate_op_defs()}
    assert ops == set(INDEX_OPS)


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


def search_pod():
    deployment = manifest("Deployment")
    return deployment, deployment["spec"]["template"]["spec"], deployment["spec"]["template"]["spec"]["containers"][0]


def test_the_search_deployment_runs_backfill_serve_with_flags_the_cli_accepts():
    from backfill.cli import build_parser, cmd_serve

    _, _, container = search_pod()
    assert container["command"][0] == "backfill"  # pyproject's console script, installed in the image
    args = build_parser().parse_args(container["command"][1:])  # a renamed or dropped flag fails here
    assert args.fn is cmd_serve and args.host == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": args.port}
    pyproject = (DEPLOY.parent / "pyproject.toml").read_text()
    assert re.search(r'^backfill = "backfill\.cli:main"$', pyproject, re.M)
    # the CPU limit sets torch and FAISS threads; searches in flight beyond it only queue inside torch
    cpus = int(container["resources"]["limits"]["cpu"])
    assert container["resources"]["requests"] == container["resources"]["limits"] and args.max_in_flight == cpus


def test_the_search_probes_hit_real_routes_outside_the_token_and_the_queue():
    from types import SimpleNamespace

    from backfill.service import PROBES, ServiceConfig, create_app

    app = create_app(SimpleNamespace(model_name="refcnn"), ServiceConfig())
    routes = {route.path: route.methods for route in app.routes}
    _, _, container = search_pod()
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert probe["path"] in routes and "GET" in routes[probe["path"]], f"{kind}: no route {probe['path']}"
        assert probe["path"] in PROBES, f"{kind}: {probe['path']} would need the bearer token"
        assert probe["port"] in {p["name"] for p in container["ports"]}
    # readiness follows the served build (503 until one loads); liveness only the process, or an outage restarts it
    assert probes["readinessProbe"]["path"] == "/healthz" and probes["livenessProbe"]["path"] == "/livez"


def test_the_search_pod_gets_the_token_from_a_secret_and_the_root_like_the_code_location():
    from backfill.settings import BY_NAME

    _, pod, container = search_pod()
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= set(BY_NAME), set(env) - set(BY_NAME)  # every name is a variable the product reads
    token = env["BACKFILL_SERVICE_TOKEN"]
    assert "value" not in token and set(token["valueFrom"]) == {"secretKeyRef"}
    code_location = {e["name"]: e.get("value") for e in values()["dagster-user-deployments"]["deployments"][0]["env"]}
    assert env["BACKFILL_ROOT"]["value"] == code_location["BACKFILL_ROOT"]
    assert env["BACKFILL_MODEL"]["value"] == code_location["BACKFILL_MODEL"]
    repository = values()["dagster-user-deployments"]["deployments"][0]["image"]["repository"]
    assert container["image"].rsplit(":", 1)[0] == repository
    assert pod["serviceAccountName"] == manifest("ServiceAccount")["metadata"]["name"]


def test_the_search_pod_is_read_only_non_root_and_writes_its_cache_to_an_empty_dir():
    _, pod, container = search_pod()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)[-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] and str(pod["securityContext"]["runAsUser"]) == user
    assert container["securityContext"]["readOnlyRootFilesystem"]
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty]
    cache = next(e["value"] for e in container["env"] if e["name"] == "BACKFILL_CACHE_DIR")
    assert any(cache.startswith(path.rstrip("/") + "/") for path in writable), (cache, writable)


def test_the_search_service_selects_the_search_pods_on_their_http_port():
    deployment, _, container = search_pod()
    service = manifest("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container["ports"]}
    assert (
        service["metadata"]["namespace"]
        == deployment["metadata"]["namespace"]
        == manifest("Namespace")["metadata"]["name"]
    )


def test_helm_dequeue_retries_outlast_a_code_server_restart():
    from dagster import instance_for_test

    custom = values()["dagsterDaemon"]["runCoordinator"]["config"]["customRunCoordinator"]
    # the block the chart renders into dagster.yaml (its _run-coordinator.tpl), with the values' run limits
    rendered = {"module": custom["module"], "class": custom["class"], "config": custom["config"]}
    concurrency = {"runs": {"max_concurrent_runs": values()["concurrency"]["runs"]["maxConcurrentRuns"]}}
    with instance_for_test(overrides={"run_coordinator": rendered, "concurrency": concurrency}) as instance:
        queue = instance.get_concurrency_config().run_queue_config
        # a run is re-queued for minutes (a pod restart, an image pull) before it fails
        assert queue.max_user_code_failure_retries * queue.user_code_failure_retry_delay >= 300
        assert queue.max_concurrent_runs == 200
