"""Pool prices and spot flags in the pools file: read into Pool, refused with the path of the bad value."""

import pytest

from backfill.errors import ConfigError
from backfill.plan import POD_START_S, RUN_LAUNCH_S, RUN_OVERHEAD_S
from ops.pools import load_pools, parse_pools, pod_spec
from tests.dagster.test_pools import _pools_yaml


def test_the_shipped_pools_have_prices_and_say_which_are_spot():
    pools = load_pools()
    gpu = pools.get("gpu-spot")
    assert gpu.spot and gpu.price_spot < gpu.price_on_demand and gpu.gpus == 1 and gpu.cpus == 8
    assert not pools.get("index").spot
    spec = pod_spec(gpu)
    assert (spec.gpus, spec.price_spot, spec.device) == (1, gpu.price_spot, "cuda")
    assert spec.startup_s == pytest.approx(RUN_OVERHEAD_S + RUN_LAUNCH_S + POD_START_S)


def test_a_pool_without_prices_is_valid_and_unpriced():
    pool = parse_pools(_pools_yaml(pricePerHour=None, spot=None), "pools.yaml").get("gpu-spot")
    assert pool.price_spot is None and pool.price_on_demand is None and not pool.spot


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"pricePerHour": {"spot": 0.4}}, "pool 'gpu-spot': pricePerHour: is missing 'onDemand'"),
        ({"pricePerHour": {"spot": -1, "onDemand": 1}}, "pricePerHour.spot must be a non-negative number"),
        ({"pricePerHour": {"spot": "cheap", "onDemand": 1}}, "got 'cheap'"),
        ({"pricePerHour": {"spot": 1, "onDemand": 2, "reserved": 1}}, "unknown keys ['reserved']"),
        ({"pricePerHour": 1.0}, "pricePerHour must be a mapping"),
        ({"spot": "yes"}, "spot must be true or false, got 'yes'"),
    ],
)
def test_bad_prices_are_refused_with_their_path(changes, message):
    with pytest.raises(ConfigError) as err:
        parse_pools(_pools_yaml(**changes), "pools.yaml")
    assert str(err.value).startswith("pools file pools.yaml: ") and message in str(err.value)
