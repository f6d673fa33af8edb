"""Pools: named placements for step pods (resources, nodes, priority, grace) loaded from a YAML file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backfill.device import require_device
from backfill.errors import ConfigError
from backfill.plan import POD_START_S, RUN_LAUNCH_S, RUN_OVERHEAD_S, PodSpec
from backfill.settings import DEFAULT_POOLS_FILE, setting  # noqa: F401 (DEFAULT_POOLS_FILE: for tools and tests)
from ops.pool_schema import GPU, NAME, POOL_SCHEMA, Invalid, check_record, quantity

POOL_TAG = "backfill/pool"  # run tag (set on a backfill) that chooses the pool of its step pods
POOLS_FILE_ENV = "BACKFILL_POOLS_FILE"
POOL_ENV = "BACKFILL_POOL"
# the step must see SIGTERM, finish and commit its chunk (grace_s), then report to Dagster
REPORT_MARGIN_S = 10


@dataclass(frozen=True)
class Pool:
    """Where and how big the step pods of one kind of capacity are."""

    name: str
    device: str  # "cuda" on GPU pools, "cpu" otherwise: the engine's device follows the pool
    requests: Mapping[str, str]
    limits: Mapping[str, str]
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    affinity: Mapping[str, Any]
    priority_class: str
    grace_s: int
    max_concurrent_runs: int
    description: str = ""
    price_spot: float | None = None  # per pod-hour, on spot/preemptible capacity (pricePerHour.spot)
    price_on_demand: float | None = None  # per pod-hour, on demand (pricePerHour.onDemand)
    spot: bool = False  # preemptible capacity: its pod-hours count as spot and are priced at pricePerHour.spot

    @property
    def cpus(self) -> float:
        return quantity(self.limits["cpu"], "resources.limits.cpu")

    @property
    def gpus(self) -> int:
        return int(quantity(self.limits.get(GPU, "0"), f"resources.limits.{GPU}"))

    def k8s_config(self) -> dict[str, Any]:
        """The step's `dagster-k8s/config` (UserDefinedDagsterK8sConfig as a dict).

        SHALLOW merge on purpose: dagster-k8s merges this onto the run launcher's
        runK8sConfig, which places run workers on on-demand nodes. A DEEP merge would append
        our tolerations to theirs and union the node selectors (an on-demand label and a spot
        label together match no node); SHALLOW replaces each key we set, so the pool alone
        decides placement, and every placement key is always set (empty when unused).
        """
        return {
            "merge_behavior": "SHALLOW",
            "container_config": {"resources": {"requests": dict(self.requests), "limits": dict(self.limits)}},
            "pod_spec_config": {
                "node_selector": dict(self.node_selector),
                "tolerations": [dict(t) for t in self.tolerations],
                "affinity": dict(self.affinity),
                "priority_class_name": self.priority_class,
                "termination_grace_period_seconds": self.grace_s,
            },
            # the same rule as assets/k8s.py: Kubernetes never restarts a step pod itself
            "job_spec_config": {"backoff_limit": 0},
        }


@dataclass(frozen=True)
class Pools:
    """Every pool of a deployment, the pool for runs without a pool tag, and the one for index steps."""

    pools: Mapping[str, Pool]
    default: str
    index_pool: str | None = None
    source: str = field(default="", compare=False)

    def get(self, name: str, what: str = "pool ") -> Pool:
        if name not in self.pools:
            raise ConfigError(
                f"{what}{name!r} is not a pool defined in {self.source or 'the pools file'}; "
                f"defined pools: {', '.join(sorted(self.pools))} (add it there, or pick one of these)"
            )
        return self.pools[name]

    def for_tags(self, tags: Mapping[str, str]) -> Pool:
        """The pool a run's tags choose (tag backfill/pool), else the default pool."""
        if POOL_TAG in tags:
            return self.get(tags[POOL_TAG], what=f"run tag {POOL_TAG}=")
        return self.pools[self.default]


def load_pools(path: str | os.PathLike | None = None, *, min_grace_s: float = 0.0) -> Pools:
    """Read and validate a pools file (default: BACKFILL_POOLS_FILE); errors name the file, the pool and the field."""
    path = Path(path if path is not None else setting(POOLS_FILE_ENV))
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"pools file {path} does not exist (set {POOLS_FILE_ENV} to the pools file)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"pools file {path} is not valid YAML: {exc}") from None
    return parse_pools(data, str(path), min_grace_s=min_grace_s)


def parse_pools(data: Any, source: str, *, min_grace_s: float = 0.0) -> Pools:
    def bad(problem: str) -> ConfigError:
        return ConfigError(f"pools file {source}: {problem}")

    if not isinstance(data, dict):
        raise bad("must be a mapping with 'pools' and 'default'")
    unknown = set(data) - {"pools", "default", "indexPool"}
    if unknown:
        raise bad(f"unknown top-level keys {sorted(unknown)} (allowed: pools, default, indexPool)")
    raw = data.get("pools")
    if not isinstance(raw, dict) or not raw:
        raise bad("'pools' must be a non-empty mapping of pool name to settings")
    pools = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise bad(f"pool name {name!r} must be a lowercase DNS label (letters, digits, '-'; at most 63)")
        try:
            pools[name] = _pool(name, spec, min_grace_s)
        except Invalid as exc:
            raise bad(f"pool {name!r}: {exc}") from None
    for key in ("default", "indexPool"):
        value = data.get(key)
        if (key == "default" or value is not None) and value not in pools:
            raise bad(f"{key!r} must name one of the pools {sorted(pools)}, got {value!r}")
    return Pools(pools=pools, default=data["default"], index_pool=data.get("indexPool"), source=source)


def _pool(name: Any, spec: Any, min_grace_s: float) -> Pool:
    """One pool: the schema checks each value, then the rules that tie values together."""
    spec = check_record(spec, POOL_SCHEMA, "")
    device, resources = spec["device"], spec["resources"]
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for key in ("cpu", "memory"):
        # threads follow the CPU limit (cgroup) and a pod without a memory limit can take a node down
        if key not in limits:
            raise Invalid(f"resources.limits.{key} is required")
    for key, value in requests.items():
        if key in limits and quantity(value, "") > quantity(limits[key], ""):
            raise Invalid(f"resources.requests.{key}={value} is more than resources.limits.{key}={limits[key]}")
    if GPU in requests and GPU in limits and str(requests[GPU]) != str(limits[GPU]):
        raise Invalid(
            f"resources.requests.{GPU} must equal resources.limits.{GPU} (Kubernetes does not overcommit GPUs)"
        )
    gpus = quantity(limits.get(GPU, "0"), f"resources.limits.{GPU}")
    if device == "cuda" and gpus < 1:
        raise Invalid(f"device 'cuda' needs resources.limits.{GPU} of at least 1 (the pod gets no GPU otherwise)")
    if device == "cpu" and (gpus or GPU in requests):
        raise Invalid(f"device 'cpu' must not ask for {GPU} (a GPU would sit idle); use device 'cuda'")
    grace, floor = spec["terminationGracePeriodSeconds"], int(min_grace_s) + REPORT_MARGIN_S
    if not isinstance(grace, int) or isinstance(grace, bool) or grace < floor:
        raise Invalid(
            f"terminationGracePeriodSeconds must be an integer of at least {floor} "
            f"(BACKFILL_GRACE_S={min_grace_s:g} to commit the chunk in hand + {REPORT_MARGIN_S} s to report), "
            f"got {grace!r}"
        )
    return Pool(
        name=name,
        device=device,
        requests={k: str(v) for k, v in requests.items()},
        limits={k: str(v) for k, v in limits.items()},
        node_selector=dict(spec.get("nodeSelector", {})),
        tolerations=tuple(dict(t) for t in spec.get("tolerations", [])),
        affinity=dict(spec.get("affinity", {})),
        priority_class=spec["priorityClassName"],
        grace_s=grace,
        max_concurrent_runs=spec["maxConcurrentRuns"],
        description=str(spec.get("description", "")),
        price_spot=spec.get("pricePerHour", {}).get("spot"),
        price_on_demand=spec.get("pricePerHour", {}).get("onDemand"),
        spot=spec.get("spot", False),
    )


def pod_spec(pool: Pool) -> PodSpec:
    """One pod of the pool as the plan sees it: CPUs and GPUs (its limits), prices, start-up with a pod start."""
    return PodSpec(
        pool.name,
        pool.device,
        cpus=pool.cpus,
        gpus=pool.gpus,
        price_spot=pool.price_spot,
        price_on_demand=pool.price_on_demand,
        startup_s=RUN_OVERHEAD_S + RUN_LAUNCH_S + POD_START_S,
    )


def device_for_pool(pool: Pool) -> str:
    """The engine's device on this pool; a GPU pool without CUDA is a permanent error, never a silent CPU run."""
    fix = (
        "run the CUDA image (deploy/Dockerfile with --build-arg VARIANT=cuda) on a node with an NVIDIA driver "
        f"and keep resources.limits.{GPU} in the pool, or launch the backfill with {POOL_TAG}=<a cpu pool>"
    )
    return require_device(pool.device, f"pool {pool.name!r} runs its steps", fix)


def device_for_run(tags: Mapping[str, str], default: str) -> str:
    """The device of the run's pool when it has a pool tag (always, in the k8s deployment), else `default`."""
    if POOL_TAG not in tags:
        return default
    return device_for_pool(load_pools().for_tags(tags))


def pool_tags(pool: str, pools_file: str | os.PathLike) -> dict[str, str]:
    """{backfill/pool: pool} for the runs that sensors and schedules launch ({} for no pool); the pool must exist."""
    if not pool:
        return {}
    load_pools(pools_file).get(pool, what=f"environment variable {POOL_ENV}=")
    return {POOL_TAG: pool}
