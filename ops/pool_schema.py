"""The shape of one pool in the pools file, as data, and the one checker that walks it."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

GPU = "nvidia.com/gpu"
TOLERATION_OPERATORS = ("Equal", "Exists")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS label: pool names become label values
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_SUFFIX.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60})

Check = Callable[[Any, str], Any]  # (value, its path in the pool) -> the value, or raises Invalid


class Invalid(Exception):
    """One value of a pool is wrong; the message names its path, the caller adds the file and the pool."""


def _refuse(path: str, problem: str, value: Any) -> Invalid:
    return Invalid(f"{path} {problem}, got {value!r}")


@dataclass(frozen=True)
class Key:
    """One key of a mapping in the pools file: how its value is checked, and whether it must be there."""

    check: Check
    required: bool = False


def check_record(value: Any, schema: Mapping[str, Key], path: str) -> dict[str, Any]:
    """A mapping with only the schema's keys, every required one present, each value checked at its path."""
    prefix = f"{path}: " if path else ""
    if not isinstance(value, dict):
        raise _refuse(path or "settings", "must be a mapping", value)
    unknown = set(value) - set(schema)
    if unknown:
        raise Invalid(f"{prefix}unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(schema))})")
    for key, rule in schema.items():
        if rule.required and key not in value:
            raise Invalid(f"{prefix}is missing {key!r}")
    return {key: schema[key].check(item, f"{path}.{key}" if path else key) for key, item in value.items()}


def record(schema: Mapping[str, Key]) -> Check:
    return lambda value, path: check_record(value, schema, path)


def list_of(item: Check) -> Check:
    def check(value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise _refuse(path, "must be a list", value)
        return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]

    return check


def one_of(options: tuple[str, ...], note: str = "") -> Check:
    def check(value: Any, path: str) -> Any:
        if value not in options:
            raise _refuse(path, f"must be one of {options}{note}", value)
        return value

    return check


def that(ok: Callable[[Any], bool], problem: str) -> Check:
    """A check from a predicate and the words for a value that fails it."""

    def check(value: Any, path: str) -> Any:
        if not ok(value):
            raise _refuse(path, problem, value)
        return value

    return check


def quantity(value: Any, path: str) -> float:
    """A Kubernetes quantity ('4', '500m', '16Gi') as a number."""
    text = str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    match = _QUANTITY.match(text)
    if not match:
        raise _refuse(path, "must be a Kubernetes quantity such as '4', '500m' or '16Gi'", value)
    return float(match.group(1)) * _SUFFIX[match.group(3) or ""]


def _quantities(value: Any, path: str) -> dict:
    value = {} if value is None else value  # `requests:` with nothing under it
    if not isinstance(value, dict):
        raise _refuse(path, "must be a mapping of resource name to quantity", value)
    for key, item in value.items():
        quantity(item, f"{path}.{key}")
    return value


def _string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _toleration(value: Any, path: str) -> dict:
    checked = check_record(value, TOLERATION_SCHEMA, path)
    # kubernetes-validate does not check how these combine; the API server would reject the Job
    operator, effect = checked.get("operator", "Equal"), checked.get("effect", "")
    if operator == "Exists" and checked.get("value"):
        raise Invalid(f"{path}: operator Exists must not have a value")
    if operator == "Equal" and not checked.get("key"):
        raise Invalid(f"{path}: operator Equal needs a key")
    if "tolerationSeconds" in checked and effect != "NoExecute":
        raise Invalid(f"{path}: tolerationSeconds only applies to effect NoExecute")
    return checked


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_STRING = that(lambda v: isinstance(v, str), "must be a string (quote 'true')")
# an hourly price per pod (backfill plan and backfill_report multiply pod-hours by it)
_PRICE = that(
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e6,
    "must be a non-negative number (the price of one pod for one hour, e.g. 0.35)",
)
PRICE_SCHEMA = {"spot": Key(_PRICE, required=True), "onDemand": Key(_PRICE, required=True)}
TOLERATION_SCHEMA = {
    "key": Key(_STRING),
    "operator": Key(one_of(TOLERATION_OPERATORS)),
    "value": Key(_STRING),
    "effect": Key(one_of(("",) + TOLERATION_EFFECTS, " (or empty for all)")),
    "tolerationSeconds": Key(that(_is_int, "must be an integer")),
}
POOL_SCHEMA = {
    "device": Key(one_of(("cpu", "cuda")), required=True),
    "resources": Key(record({"requests": Key(_quantities), "limits": Key(_quantities)}), required=True),
    "nodeSelector": Key(that(_string_map, "must map label names to string values (quote 'true')")),
    "tolerations": Key(list_of(_toleration)),
    "affinity": Key(
        that(
            lambda v: isinstance(v, dict) and set(v) <= {"nodeAffinity", "podAffinity", "podAntiAffinity"},
            "must be a Kubernetes Affinity mapping (nodeAffinity, podAffinity, podAntiAffinity)",
        )
    ),
    "priorityClassName": Key(
        that(lambda v: isinstance(v, str) and bool(v), "must be a non-empty string"), required=True
    ),
    # its floor depends on BACKFILL_GRACE_S: checked with the pool's other rules (ops/pools.py)
    "terminationGracePeriodSeconds": Key(lambda value, path: value, required=True),
    "maxConcurrentRuns": Key(that(lambda v: _is_int(v) and v >= 1, "must be a positive integer"), required=True),
    "description": Key(lambda value, path: value),
    "pricePerHour": Key(record(PRICE_SCHEMA)),
    # preemptible capacity (spot, or tidal nodes reclaimed by day): the report's share on spot counts it
    "spot": Key(that(lambda v: isinstance(v, bool), "must be true or false")),
}
