"""The plan's arithmetic: waves over pods, the queue floor, hours, cost, bytes, the index plan."""

import pytest

from backfill.config import IndexConfig
from backfill.errors import ConfigError
from backfill.index_plan import plan_index
from backfill.plan import QUEUE_RUNS_S, PlanInputs, PodSpec, index_build_s, plan_backfill, plan_rows, pod_rate

CPU = PodSpec("cpu-tidal", "cpu", cpus=4, price_spot=0.1, price_on_demand=0.3, startup_s=5.0)
GPU = PodSpec("gpu-spot", "cuda", cpus=8, gpus=1, price_spot=0.5, price_on_demand=1.5, startup_s=10.0)


def inputs(rows=(200, 200, 200, 200), img_s=100.0, pods=2, pod=CPU, **kw) -> PlanInputs:
    return PlanInputs(version="v1", dim=128, shard_rows=tuple(rows), img_s_per_pod=img_s, pods=pods, pod=pod, **kw)


def test_shards_run_in_waves_over_the_pods():
    plan = plan_backfill(inputs())
    # each partition: 200 / 100 + 5 s start-up = 7 s; 4 shards on 2 pods = 2 waves, the second
    # pod's first run queued 1 / QUEUE_RUNS_S after the first
    assert plan.partition_s == (7.0, 7.0, 7.0, 7.0)
    assert plan.wall_s == pytest.approx(14.0 + 1 / QUEUE_RUNS_S) and plan.waves == 2 and not plan.queue_bound
    assert plan.images == 800 and plan.shards == 4


def test_a_faster_pod_takes_the_next_shard():
    # pull model: pod A gets the 100 s shard, pod B the short ones one after the other
    plan = plan_backfill(inputs(rows=(10_000, 100, 100, 100), img_s=100.0, pod=PodSpec("p", "cpu", 1, startup_s=0)))
    assert plan.wall_s == pytest.approx(100.0)


def test_the_daemon_queue_rate_is_a_floor():
    # 10 runs of 2 s on 100 pods, queued at 1 run/s: the last is queued at 9 s, done at 11 s
    plan = plan_backfill(inputs(rows=[100] * 10, img_s=100.0, pods=100, queue_runs_s=1.0,
                                pod=PodSpec("p", "cpu", 1, startup_s=1.0)))  # fmt: skip
    assert plan.wall_s == pytest.approx(11.0) and plan.queue_bound


def test_hours_and_cost_count_the_pods_busy_time():
    plan = plan_backfill(inputs())
    assert plan.pod_hours == pytest.approx(28 / 3600)
    assert plan.core_hours == pytest.approx(4 * 28 / 3600) and plan.gpu_hours == 0
    assert plan.cost_spot == pytest.approx(0.1 * 28 / 3600) and plan.cost_on_demand == pytest.approx(0.3 * 28 / 3600)
    gpu = plan_backfill(inputs(pod=GPU, img_s=1000.0))
    assert gpu.pod_hours == pytest.approx(4 * (0.2 + 10) / 3600) and gpu.gpu_hours == pytest.approx(gpu.pod_hours)
    shared = plan_backfill(inputs(pod=PodSpec("local", "cpu", 2, startup_s=5.0, shares_host=True)))
    assert shared.core_hours == pytest.approx(28 / 3600)  # 2 run slots on a 2-CPU machine: 1 CPU each
    unpriced = plan_backfill(inputs(pod=PodSpec("local", "cpu", 2)))
    assert unpriced.cost_spot is None and "no price" in dict(plan_rows(unpriced))["cost on spot"]


def test_bytes_and_index_come_from_the_rows_and_plan_index():
    plan = plan_backfill(inputs(rows=[5000] * 4))
    assert plan.embedding_bytes == 20_000 * (128 * 2 + 8)
    expected = plan_index(20_000, 128, IndexConfig())
    assert plan.index_factory == expected.factory and plan.index_bytes == expected.memory_bytes
    assert plan.index_build_s > 0


def test_index_build_time_is_the_measured_build_at_its_reference_point():
    assert index_build_s(10_000_000, 256, 1024, 65_536, 200) == pytest.approx(59.9 + 449.0 + 36.6)
    assert index_build_s(10_000_000, 256, 1024, 65_536, 200, threads=4) == pytest.approx((59.9 + 449.0 + 36.6) / 4)


def test_pod_rate_follows_the_pod():
    local = PodSpec("local", "cpu", cpus=2, shares_host=True)
    assert pod_rate(100.0, 2, "cpu", local, pods=2) == pytest.approx(50.0)  # two run slots share 2 cores
    assert pod_rate(100.0, 2, "cpu", local, pods=1) == pytest.approx(100.0)
    assert pod_rate(100.0, 2, "cpu", CPU, pods=64) == pytest.approx(200.0)  # 4-CPU pods: linear in CPUs
    assert pod_rate(5000.0, 16, "cuda", GPU, pods=32) == pytest.approx(5000.0)
    with pytest.raises(ConfigError, match="calibration ran on cpu"):
        pod_rate(100.0, 2, "cpu", GPU, pods=1)


@pytest.mark.parametrize("change", [{"img_s": 0.0}, {"pods": 0}, {"rows": (0, 0)}, {"queue_runs_s": 0.0}])
def test_impossible_inputs_are_refused(change):
    with pytest.raises(ConfigError, match="v1"):
        plan_backfill(inputs(**change))
