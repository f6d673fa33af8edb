"""Pools: named placements for step pods (resources, nodes, priority, grace) loaded from a YAML file."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from backfill.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
POOL_TAG = "backfill/pool"  # run tag (set on a backfill) that chooses the pool of its step pods
POOLS_FILE_ENV = "BACKFILL_POOLS_FILE"
DEFAULT_POOLS_FILE = REPO / "deploy" / "pools.yaml"
GPU = "nvidia.com/gpu"
# the step must see SIGTERM, finish and commit its chunk (grace_s), then report to Dagster
REPORT_MARGIN_S = 10

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_SUFFIX.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60})
_POOL_KEYS = {
    "device", "resources", "nodeSelector", "tolerations", "affinity",
    "priorityClassName", "terminationGracePeriodSeconds", "maxConcurrentRuns", "description",
}  # fmt: skip
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
TOLERATION_OPERATORS = ("Equal", "Exists")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


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


def pools_file() -> Path:
    return Path(os.environ.get(POOLS_FILE_ENV) or DEFAULT_POOLS_FILE)


def load_pools(path: str | os.PathLike | None = None, *, min_grace_s: float = 0.0) -> Pools:
    """Read and validate a pools file; every error names the file, the pool and the field."""
    path = Path(path) if path is not None else pools_file()
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
    pools = {name: _parse_pool(name, spec, bad, min_grace_s) for name, spec in raw.items()}
    default = data.get("default")
    if default not in pools:
        raise bad(f"'default' must name one of the pools {sorted(pools)}, got {default!r}")
    index_pool = data.get("indexPool")
    if index_pool is not None and index_pool not in pools:
        raise bad(f"'indexPool' must name one of the pools {sorted(pools)}, got {index_pool!r}")
    return Pools(pools=pools, default=default, index_pool=index_pool, source=source)


def _parse_pool(name: Any, spec: Any, bad, min_grace_s: float) -> Pool:
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad(f"pool name {name!r} must be a lowercase DNS label (letters, digits, '-'; at most 63)")

    def fail(problem: str) -> ConfigError:
        return bad(f"pool {name!r}: {problem}")

    if not isinstance(spec, dict):
        raise fail("settings must be a mapping")
    unknown = set(spec) - _POOL_KEYS
    if unknown:
        raise fail(f"unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(_POOL_KEYS))})")
    for key in ("device", "resources", "priorityClassName", "terminationGracePeriodSeconds", "maxConcurrentRuns"):
        if key not in spec:
            raise fail(f"is missing {key!r}")
    device = spec["device"]
    if device not in ("cpu", "cuda"):
        raise fail(f"device must be 'cpu' or 'cuda', got {device!r}")
    requests, limits = _resources(spec["resources"], fail)
    gpus = _quantity(limits.get(GPU, "0"), f"resources.limits.{GPU}", fail)
    if device == "cuda" and gpus < 1:
        raise fail(f"device 'cuda' needs resources.limits.{GPU} of at least 1 (the pod gets no GPU otherwise)")
    if device == "cpu" and (gpus or GPU in requests):
        raise fail(f"device 'cpu' must not ask for {GPU} (a GPU would sit idle); use device 'cuda'")
    node_selector = spec.get("nodeSelector", {})
    if not isinstance(node_selector, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in node_selector.items()):
        raise fail(f"nodeSelector must map label names to string values (quote 'true'), got {node_selector!r}")
    tolerations = tuple(_toleration(i, t, fail) for i, t in enumerate(_list(spec.get("tolerations", []), "tolerations", fail)))
    affinity = spec.get("affinity", {})
    if not isinstance(affinity, dict) or not set(affinity) <= {"nodeAffinity", "podAffinity", "podAntiAffinity"}:
        raise fail(f"affinity must be a Kubernetes Affinity mapping (nodeAffinity, podAffinity, podAntiAffinity), got {affinity!r}")
    priority = spec["priorityClassName"]
    if not isinstance(priority, str) or not priority:
        raise fail(f"priorityClassName must be a non-empty string, got {priority!r}")
    grace = spec["terminationGracePeriodSeconds"]
    floor = int(min_grace_s) + REPORT_MARGIN_S
    if not isinstance(grace, int) or isinstance(grace, bool) or grace < floor:
        raise fail(
            f"terminationGracePeriodSeconds must be an integer of at least {floor} (BACKFILL_GRACE_S={min_grace_s:g} to commit "
            f"the chunk in hand + {REPORT_MARGIN_S} s to report), got {grace!r}"
        )
    concurrent = spec["maxConcurrentRuns"]
    if not isinstance(concurrent, int) or isinstance(concurrent, bool) or concurrent < 1:
        raise fail(f"maxConcurrentRuns must be a positive integer, got {concurrent!r}")
    return Pool(
        name=name,
        device=device,
        requests=requests,
        limits=limits,
        node_selector=dict(node_selector),
        tolerations=tolerations,
        affinity=dict(affinity),
        priority_class=priority,
        grace_s=grace,
        max_concurrent_runs=concurrent,
        description=str(spec.get("description", "")),
    )


def _resources(raw: Any, fail) -> tuple[dict[str, str], dict[str, str]]:
    if not isinstance(raw, dict) or not set(raw) <= {"requests", "limits"}:
        raise fail(f"resources must be a mapping with 'requests' and 'limits', got {raw!r}")
    requests, limits = raw.get("requests") or {}, raw.get("limits") or {}
    for what, values in (("requests", requests), ("limits", limits)):
        if not isinstance(values, dict):
            raise fail(f"resources.{what} must be a mapping of resource name to quantity, got {values!r}")
        for key, value in values.items():
            _quantity(value, f"resources.{what}.{key}", fail)
    for key in ("cpu", "memory"):
        # threads follow the CPU limit (cgroup) and a pod without a memory limit can take a node down
        if key not in limits:
            raise fail(f"resources.limits.{key} is required")
    for key, value in requests.items():
        if key in limits and _quantity(value, "", fail) > _quantity(limits[key], "", fail):
            raise fail(f"resources.requests.{key}={value} is more than resources.limits.{key}={limits[key]}")
    if GPU in requests and GPU in limits and str(requests[GPU]) != str(limits[GPU]):
        raise fail(f"resources.requests.{GPU} must equal resources.limits.{GPU} (Kubernetes does not overcommit GPUs)")
    return {k: str(v) for k, v in requests.items()}, {k: str(v) for k, v in limits.items()}


def _quantity(value: Any, where: str, fail) -> float:
    match = _QUANTITY.match(str(value)) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    if not match:
        raise fail(f"{where} must be a Kubernetes quantity such as '4', '500m' or '16Gi', got {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(3) or ""]


def _list(value: Any, what: str, fail) -> list:
    if not isinstance(value, list):
        raise fail(f"{what} must be a list, got {value!r}")
    return value


def _toleration(i: int, raw: Any, fail) -> dict[str, Any]:
    where = f"tolerations[{i}]"
    if not isinstance(raw, dict) or not raw:
        raise fail(f"{where} must be a mapping, got {raw!r}")
    unknown = set(raw) - _TOLERATION_KEYS
    if unknown:
        raise fail(f"{where} has unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(_TOLERATION_KEYS))})")
    # kubernetes-validate does not check these enums; the API server would reject the Job
    operator = raw.get("operator", "Equal")
    if operator not in TOLERATION_OPERATORS:
        raise fail(f"{where}.operator must be one of {TOLERATION_OPERATORS}, got {operator!r}")
    if operator == "Exists" and raw.get("value"):
        raise fail(f"{where}: operator Exists must not have a value")
    if operator == "Equal" and not raw.get("key"):
        raise fail(f"{where}: operator Equal needs a key")
    effect = raw.get("effect", "")
    if effect and effect not in TOLERATION_EFFECTS:
        raise fail(f"{where}.effect must be one of {TOLERATION_EFFECTS} (or empty for all), got {effect!r}")
    if "tolerationSeconds" in raw and effect != "NoExecute":
        raise fail(f"{where}: tolerationSeconds only applies to effect NoExecute")
    for key in ("key", "value"):
        if key in raw and not isinstance(raw[key], str):
            raise fail(f"{where}.{key} must be a string (quote 'true'), got {raw[key]!r}")
    return dict(raw)


def device_for_pool(pool: Pool, cuda_available: bool) -> str:
    """The engine's device on this pool; a GPU pool without CUDA is a permanent error, never a silent CPU run."""
    if pool.device == "cuda" and not cuda_available:
        raise ConfigError(
            f"pool {pool.name!r} runs its steps on cuda, but CUDA is not available in this pod "
            "(torch.cuda.is_available() is False): run the CUDA image (deploy/Dockerfile with --build-arg "
            f"VARIANT=cuda) on a node with an NVIDIA driver and keep resources.limits.{GPU} in the pool, "
            f"or launch the backfill with {POOL_TAG}=<a cpu pool>"
        )
    return pool.device


def device_for_run(tags: Mapping[str, str], default: str) -> str:
    """The device of the run's pool when it has a pool tag (always, in the k8s deployment), else `default`."""
    if POOL_TAG not in tags:
        return default
    import torch

    return device_for_pool(load_pools().for_tags(tags), torch.cuda.is_available())


POOL_ENV = "BACKFILL_POOL"


def pool_tags_from_env() -> dict[str, str]:
    """{backfill/pool: $BACKFILL_POOL} for runs that sensors and schedules launch; {} when unset."""
    name = os.environ.get(POOL_ENV, "")
    if not name:
        return {}
    load_pools().get(name, what=f"environment variable {POOL_ENV}=")
    return {POOL_TAG: name}
