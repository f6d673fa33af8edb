"""plan_backfill: a model version's backfill before launch, wall time, pod- and GPU-hours, cost, bytes, index."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from backfill.config import IndexConfig
from backfill.errors import ConfigError
from backfill.index_plan import plan_index

# Measured constants, each with its source; docs/plan.md says how each enters the estimate.
# bench/overhead_bench.py (docs/performance.md): a run's duration minus its partition's own compute,
# median (the step's process start, code-location imports, model load) on the local default
RUN_OVERHEAD_S = 3.6
# the same bench's fresh-process rows (interpreter 1.0 s + importing the code location 3.1 s): the run
# worker's own start, before its run starts (not inside the run's duration above)
RUN_LAUNCH_S = 4.1
# docs/scale.md (scale_bench.py queue): the slowest rate the backfill daemon queued runs at, 30,000 partitions
QUEUE_RUNS_S = 1.43
# ASSUMED, not measured (docs/scale.md): a k8s step pod scheduled, its image present, started
POD_START_S = 30.0
VECTOR_BYTES = 2  # the chunk writer stores fp16 vectors (backfill/writer.py)
ID_BYTES = 8  # and an int64 image_id per row
# docs/index.md (index_bench.py, 10M x 256, 1 FAISS thread): train 59.9 s for 65,536 x 1,024 lists x 256 dims;
# add + ground truth 449 s for 10M vectors with 1,024 lists and 200 queries; tune 36.6 s at 9,766 vectors per list
TRAIN_S_PER_UNIT = 59.9 / (65_536 * 1024 * 256)
ADD_S_PER_UNIT = 449.0 / (10_000_000 * (1024 + 200) * 256)
TUNE_S_PER_LIST_ROW = 36.6 / (10_000_000 / 1024)


@dataclass(frozen=True)
class Startup:
    """A partition's start-up beyond its compute, and where the figure comes from (the plan prints it)."""

    seconds: float
    source: str
    # a probe of the process starts alone: the calibration's model load is added to it
    add_model_load: bool = False


@dataclass(frozen=True)
class PodSpec:
    """What one pod (or one local run slot) of a pool is: its CPUs and GPUs, its start-up and its prices."""

    pool: str
    device: str
    cpus: float
    gpus: int = 0
    price_spot: float | None = None  # per pod-hour
    price_on_demand: float | None = None
    startup_s: float = RUN_OVERHEAD_S + RUN_LAUNCH_S  # per partition, beyond its compute
    shares_host: bool = False  # local: every run slot shares this machine's CPUs
    startup_source: str = "bench/overhead_bench.py's constants"


@dataclass(frozen=True)
class PlanInputs:
    """Everything the estimate depends on; plan_backfill is a pure function of this."""

    version: str
    dim: int
    shard_rows: tuple[int, ...]  # rows per manifest shard, in the order the backfill launches them
    img_s_per_pod: float  # partition throughput of one pod (calibrated, scaled to the pod)
    pods: int
    pod: PodSpec
    queue_runs_s: float = QUEUE_RUNS_S
    index: IndexConfig = field(default_factory=IndexConfig)
    index_threads: int = 1


@dataclass(frozen=True)
class Plan:
    """The estimate: every figure in seconds, hours, bytes or the pool's currency."""

    inputs: PlanInputs
    images: int
    shards: int
    partition_s: tuple[float, ...]  # per shard: its compute plus start-up
    wall_s: float  # first run queued -> last partition done
    queue_bound: bool  # the daemon's queue rate, not the pods, set the wall time
    waves: int
    pod_hours: float
    core_hours: float
    gpu_hours: float
    cost_spot: float | None
    cost_on_demand: float | None
    embedding_bytes: int
    index_factory: str
    index_bytes: int
    index_build_s: float
    index_reason: str


def plan_backfill(inputs: PlanInputs) -> Plan:
    """Estimate one version's backfill: shards pulled by `pods` pods as they free up, runs queued at queue_runs_s.

    Partition i takes rows_i / img_s + start-up; run i cannot start before the daemon has queued it
    (i / queue_runs_s) nor before a pod is free (the pull model). Pod-hours count the pods' busy time
    (a step pod exists only while its partition runs); core- and GPU-hours are pod-hours times the pod's.
    """
    if inputs.img_s_per_pod <= 0 or inputs.pods < 1 or inputs.queue_runs_s <= 0:
        raise ConfigError(
            f"plan for {inputs.version}: img/s per pod ({inputs.img_s_per_pod}), pods ({inputs.pods}) and the "
            f"queue rate ({inputs.queue_runs_s} runs/s) must be positive"
        )
    rows = sum(inputs.shard_rows)
    if rows < 1:
        raise ConfigError(f"plan for {inputs.version}: the corpus has no rows (write manifest shards first)")
    pod = inputs.pod
    partition_s = tuple(r / inputs.img_s_per_pod + pod.startup_s for r in inputs.shard_rows)
    wall_s, queue_bound = _makespan(partition_s, inputs.pods, inputs.queue_runs_s)
    pod_hours = sum(partition_s) / 3600
    index = plan_index(rows, inputs.dim, inputs.index)
    return Plan(
        inputs=inputs,
        images=rows,
        shards=len(partition_s),
        partition_s=partition_s,
        wall_s=wall_s,
        queue_bound=queue_bound,
        waves=math.ceil(len(partition_s) / inputs.pods),
        pod_hours=pod_hours,
        # local run slots share this machine's CPUs: each holds its share of them
        core_hours=pod_hours * (pod.cpus / inputs.pods if pod.shares_host else pod.cpus),
        gpu_hours=pod_hours * pod.gpus,
        cost_spot=None if pod.price_spot is None else pod_hours * pod.price_spot,
        cost_on_demand=None if pod.price_on_demand is None else pod_hours * pod.price_on_demand,
        embedding_bytes=rows * (inputs.dim * VECTOR_BYTES + ID_BYTES),
        index_factory=index.factory,
        index_bytes=index.memory_bytes,
        index_build_s=index_build_s(
            rows, inputs.dim, index.nlist, index.train_size, index.n_queries, inputs.index_threads
        ),  # fmt: skip
        index_reason=index.reason,
    )


def _makespan(partition_s: tuple[float, ...], pods: int, queue_runs_s: float) -> tuple[float, bool]:
    """(when the last partition ends, whether the queue rate made that 5% later than the pods alone would)."""
    wall, unqueued = _pull(partition_s, pods, queue_runs_s), _pull(partition_s, pods, math.inf)
    return wall, wall > 1.05 * unqueued


def _pull(partition_s: tuple[float, ...], pods: int, queue_runs_s: float) -> float:
    """List scheduling: run i starts when a pod is free and the daemon has queued it (at i / queue_runs_s)."""
    free = [0.0] * min(pods, len(partition_s))  # when each pod is next free
    end = 0.0
    for i, seconds in enumerate(partition_s):
        done = max(heapq.heappop(free), i / queue_runs_s) + seconds
        heapq.heappush(free, done)
        end = max(end, done)
    return end


def index_build_s(n: int, dim: int, nlist: int, train: int, queries: int, threads: int = 1) -> float:
    """Train + add (with the held-out queries' exact search) + tune, scaled from docs/index.md's 10M build."""
    train_s = TRAIN_S_PER_UNIT * train * nlist * dim
    add_s = ADD_S_PER_UNIT * n * (nlist + queries) * dim
    tune_s = TUNE_S_PER_LIST_ROW * n / nlist if nlist else 0.0
    return (train_s + add_s + tune_s) / max(1, threads)


def pod_rate(calibrated_img_s: float, calibrated_cpus: int, calibrated_device: str, pod: PodSpec, pods: int) -> float:
    """One pod's img/s from the calibration: the same device class; CPU pods scale with their CPUs.

    Local run slots share this machine, so `pods` of them split its CPUs. A CPU pool's pod of c CPUs is
    taken as c / calibrated_cpus times the calibration (linear: an extrapolation, said in the plan).
    """
    if pod.device.startswith("cuda") != calibrated_device.startswith("cuda"):
        raise ConfigError(
            f"pool {pod.pool!r} runs on {pod.device} but the calibration ran on {calibrated_device}: run "
            f"`backfill plan` where the pool's device is (a GPU machine for a cuda pool), or pass --img-s"
        )
    if pod.shares_host:
        return calibrated_img_s * min(1.0, calibrated_cpus / (pods * pod.cpus))
    if pod.device == "cpu":
        return calibrated_img_s * pod.cpus / calibrated_cpus
    return calibrated_img_s


def hms(seconds: float) -> str:
    """1 h 02 min, 3 min 05 s, 12.3 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def money(value: float | None) -> str:
    if value is None:
        return "no price (a pool's pricePerHour)"
    return f"{value:,.2f}" if value >= 10 else f"{value:.4f}"  # a small test backfill costs cents


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """(what, value) lines of a plan, the same for the CLI and the asset's markdown."""
    i, pod = plan.inputs, plan.inputs.pod
    shards = f"{plan.shards:,} shards ({min(i.shard_rows):,}-{max(i.shard_rows):,} rows)"
    return [
        ("images", f"{plan.images:,} in {shards}"),
        ("pool", f"{pod.pool}: {i.pods} pods of {pod.cpus:g} CPUs, {pod.gpus} GPUs ({pod.device})"),
        ("img/s per pod", f"{i.img_s_per_pod:,.1f}"),
        ("start-up per partition", f"{pod.startup_s:.1f} s ({pod.startup_source})"),
        ("partition", f"{hms(min(plan.partition_s))} - {hms(max(plan.partition_s))} (compute + start-up)"),
        ("wall time", f"{hms(plan.wall_s)} ({plan.waves} waves over {i.pods} pods"
                      f"{'; the queue rate bounds it' if plan.queue_bound else ''})"),
        ("queue floor", f"{i.queue_runs_s:.2f} runs/s: {hms(plan.shards / i.queue_runs_s)} to queue every run"),
        ("pod-hours", f"{plan.pod_hours:,.3f}"),
        ("core-hours", f"{plan.core_hours:,.3f}"),
        ("GPU-hours", f"{plan.gpu_hours:,.3f}"),
        ("cost on spot", money(plan.cost_spot)),
        ("cost on demand", money(plan.cost_on_demand)),
        ("embeddings", f"{plan.embedding_bytes / 2**20:,.1f} MiB ({i.dim}-d fp16 + int64 id per row)"),
        ("index", f"{plan.index_factory}: {plan.index_bytes / 2**20:,.1f} MiB, build ~{hms(plan.index_build_s)} "
                  f"on {i.index_threads} threads"),
    ]  # fmt: skip


def plan_summary(plan: Plan, **extra: object) -> dict:
    """The figures a report puts beside its actuals (saved as JSON by `backfill plan` and backfill_plan)."""
    i = plan.inputs
    return {
        "version": i.version,
        "pool": i.pod.pool,
        "pods": i.pods,
        "shards": plan.shards,
        "images": plan.images,
        "img_s_per_pod": i.img_s_per_pod,
        "startup_s": i.pod.startup_s,
        "wall_s": plan.wall_s,
        "pod_hours": plan.pod_hours,
        "core_hours": plan.core_hours,
        "gpu_hours": plan.gpu_hours,
        "cost_spot": plan.cost_spot,
        "cost_on_demand": plan.cost_on_demand,
        "embedding_bytes": plan.embedding_bytes,
        "index_factory": plan.index_factory,
        "index_bytes": plan.index_bytes,
        "index_build_s": plan.index_build_s,
        **extra,
    }
