"""Extrapolation to a billion images: hours, memory and disk per step on named pools, from measured constants.

Every figure it prints is EXTRAPOLATED: a measured constant (its source named in MEASURED, or given on the
command line, or read from `scale_bench.py queue --json`) times a stated scaling rule. Nothing here is measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from backfill.config import IndexConfig
from backfill.index_plan import plan_index

GiB = 2**30

# Measured constants and where they were measured (this repository's docs; 2-core box unless said otherwise).
MEASURED = {
    # docs/scale.md, discover: 10,000 x 1,000-row shards at first deploy in 70.07 s (10 ticks)
    "discover_s_per_shard_1k_rows": 70.07 / 10_000,
    "discover_peak_mib": 340,
    # scale_bench.py discover --shards 100 --rows 100000 (2026-12-01): 3.36 s for 100 shards = 33.6 ms/shard,
    # so (33.6 - 7.0) ms per 99,000 extra rows: discovery's cost per million manifest rows
    "discover_s_per_mrow": (3.36 / 100 - 70.07 / 10_000) / 0.099,
    # docs/performance.md, gpu_check.sh on one H100: embed_shard end to end, ResNet-50 bf16, 256-d
    "gpu_img_s_per_pod": 5975,
    # docs/performance.md, embed_bench.py on this 2-core box: embed_shard, ResNet-18 bf16; a 4-CPU cpu-tidal pod
    # is taken as twice that (extrapolated)
    "cpu_img_s_2_cores": 61.2,
    # docs/performance.md, overhead_bench.py: a run's cost beyond its compute (interpreter, imports, model load)
    "run_overhead_s": 3.6,
    # docs/performance.md, memory_bench.py: a partition process's peak RSS (CPU, refcnn, flat in shard size)
    "partition_peak_mib": 472,
    # docs/index.md, index_bench.py at 10M x 256, 1 FAISS thread, IVF1024,SQ8, 65,536 training vectors
    "train_s": 59.9,
    "train_ref": (65_536, 1024, 256),  # (sample, nlist, dim)
    "add_s": 449.0,  # 100 parts, with each part's exact search of the 200 held-out queries
    "add_ref": (10_000_000, 1024, 256, 200),  # (vectors, nlist, dim, queries)
    "merge_s": 18.1,
    "merge_ref_bytes": 2_641_059_000,
    "tune_s": 36.6,
    "tune_ref_list": 10_000_000 / 1024,  # vectors per inverted list
}


@dataclass(frozen=True)
class Scenario:
    images: int = 1_000_000_000
    shards: int = 10_000
    versions: int = 3  # live versions: each keeps its embeddings and its index
    dim: int = 512
    runs_per_s: float = 2.0  # what the backfill daemon queues (scale_bench.py queue)
    backfill_created_s: float = 15.0  # daemon start -> backfill (one automation tick and the daemon loop)
    gpu_pods: int = 32  # deploy/pools.yaml gpu-spot maxConcurrentRuns
    gpu_img_s: float = MEASURED["gpu_img_s_per_pod"]
    pod_start_s: float = 30.0  # ASSUMED: a k8s step Job's pod scheduled, image present, started (not measured)
    discover_s_per_mrow: float = MEASURED["discover_s_per_mrow"]  # per million manifest rows
    index_pods: int = 4  # deploy/pools.yaml index maxConcurrentRuns (parts added in parallel)
    index_threads: int = 8  # FAISS threads per index pod: the pool's 8 CPUs (linear scaling assumed: optimistic)
    index_memory_mb: int = 57344  # BACKFILL_INDEX_MEMORY_MB on the index pool's 64 GiB, 8 GiB left to the process
    upload_mb_s: float = 200.0  # ASSUMED: index upload to the object store


def rows(s: Scenario) -> int:
    return s.images // s.shards


def steps(s: Scenario) -> list[dict]:
    """One dict per step: pool, hours (wall), peak memory per process, disk, and the rule used."""
    m = MEASURED
    plan = plan_index(s.images, s.dim, IndexConfig(memory_budget_mb=s.index_memory_mb))
    index_bytes = plan.memory_bytes
    per_shard = m["discover_s_per_shard_1k_rows"] + s.discover_s_per_mrow * rows(s) / 1e6
    partition_s = rows(s) / s.gpu_img_s + m["run_overhead_s"] + s.pod_start_s
    embed_bytes = s.images * (s.dim * 2 + 8)  # fp16 vectors and int64 ids
    threads = s.index_pods * s.index_threads
    sample, nlist0, dim0 = m["train_ref"]
    train_s = m["train_s"] * (plan.train_size * plan.nlist * s.dim) / (sample * nlist0 * dim0) / s.index_threads
    n0, nlist1, dim1, q0 = m["add_ref"]
    per_vector = m["add_s"] / n0 * (plan.nlist + plan.n_queries) * s.dim / ((nlist1 + q0) * dim1)
    add_s = per_vector * s.images / threads
    merge_s = m["merge_s"] * index_bytes / m["merge_ref_bytes"]
    tune_s = m["tune_s"] * (s.images / plan.nlist) / m["tune_ref_list"]
    return [
        _row("discover (first deploy)", "code server", s.shards * per_shard, m["discover_peak_mib"] / 1024,
             s.images * 8, f"{per_shard * 1000:.1f} ms/shard at {rows(s):,} rows; disk: sorted-id sidecars"),
        _row("queue (one version)", "daemon", (s.backfill_created_s + s.shards / s.runs_per_s), None, 0,
             f"{s.shards:,} runs at {s.runs_per_s:.2f} runs/s"),
        _row("embed (one version)", f"gpu-spot x{s.gpu_pods}", s.shards * partition_s / s.gpu_pods,
             m["partition_peak_mib"] / 1024, embed_bytes,
             f"{partition_s:.0f} s/partition: {rows(s):,} rows at {s.gpu_img_s:,.0f} img/s + start; mem: CPU-measured"),
        _row("index train", "index x1", train_s, (plan.train_size * s.dim * 4 + plan.nlist * s.dim * 4) / GiB, 0,
             f"{plan.train_size:,} x nlist {plan.nlist:,} x {s.dim}, {s.index_threads} threads"),
        _row("index add + ground truth", f"index x{s.index_pods}", add_s, f"<={s.index_memory_mb / 1024:.0f}",
             index_bytes,
             f"{per_vector * 1e6:.0f} core-us/vector, {threads} threads"),
        _row("index merge", "index x1", merge_s, index_bytes / GiB, index_bytes,
             "lists on disk" if plan.ondisk else "in memory"),
        _row("index tune", "index x1", tune_s, index_bytes / GiB, 0, f"{s.images // plan.nlist:,} vectors/list"),
        _row("publish (upload)", "index x1", index_bytes / (s.upload_mb_s * 2**20), 0.5, index_bytes,
             f"{index_bytes / GiB:.0f} GiB at {s.upload_mb_s:.0f} MB/s"),
    ] + [{"plan": plan.factory, "reason": plan.reason}]  # fmt: skip


def _row(step: str, pool: str, seconds: float, mem_gib: float | str | None, disk: float, rule: str) -> dict:
    return {"step": step, "pool": pool, "hours": seconds / 3600, "mem_gib": mem_gib, "disk_gib": disk / GiB,
            "rule": rule}  # fmt: skip


def feed(s: Scenario) -> dict:
    """Runs/s the GPU pool consumes against what the daemon queues, and the shard sizes that keep it fed."""
    partition_s = rows(s) / s.gpu_img_s + MEASURED["run_overhead_s"] + s.pod_start_s
    consumed = s.gpu_pods / partition_s
    start = MEASURED["run_overhead_s"] + s.pod_start_s
    return {
        "consumed_runs_s": consumed,
        "queued_runs_s": s.runs_per_s,
        "fed": consumed <= s.runs_per_s / 2,  # half the daemon's rate: headroom for retries and a second backfill
        # smallest shard the queue keeps up with (at half its rate), and the one whose start-up is 10% of compute
        "min_rows_queue": math.ceil(s.gpu_pods * s.gpu_img_s / (s.runs_per_s / 2)),
        "min_rows_overhead": math.ceil(10 * start * s.gpu_img_s),
        "start_share": start / partition_s,
    }


def pools(s: Scenario) -> list[tuple[str, int, float]]:
    """(pool, pods, img/s per pod) as deploy/pools.yaml sizes them (maxConcurrentRuns)."""
    return [("gpu-spot", s.gpu_pods, s.gpu_img_s), ("cpu-tidal", 64, 2 * MEASURED["cpu_img_s_2_cores"])]


def feed_table(s: Scenario, shard_rows: tuple[int, ...] = (100_000, 1_000_000, 2_000_000)) -> str:
    """For each pool and shard size: runs/s consumed against the daemon's, start-up share, queue time at 1B."""
    lines = [
        f"EXTRAPOLATED feed check: the daemon queues R = {s.runs_per_s:.2f} runs/s; start-up per run "
        f"{MEASURED['run_overhead_s']} s (measured) + {s.pod_start_s:.0f} s pod start (assumed)",
        f"{'pool':10} {'pods':>5} {'img/s/pod':>9} {'rows/shard':>10} {'s/partition':>11} {'runs/s used':>11} "
        f"{'fed (<=R/2)':>11} {'start-up':>8} {'shards at 1B':>12} {'queue h':>7} {'embed h':>7}",
        "-" * 110,
    ]
    for pool, pods, img_s in pools(s):
        for r in shard_rows:
            one = Scenario(**{**s.__dict__, "gpu_pods": pods, "gpu_img_s": img_s, "shards": s.images // r})
            f = feed(one)
            partition_s = r / img_s + MEASURED["run_overhead_s"] + s.pod_start_s
            lines.append(
                f"{pool:10} {pods:5d} {img_s:9,.0f} {r:10,} {partition_s:11,.0f} {f['consumed_runs_s']:11.3f} "
                f"{'yes' if f['fed'] else 'NO':>11} {f['start_share']:8.0%} {one.shards:12,} "
                f"{(s.backfill_created_s + one.shards / s.runs_per_s) / 3600:7.2f} "
                f"{one.shards * partition_s / pods / 3600:7.1f}"
            )
    return "\n".join(lines)


def from_queue_json(path: str) -> tuple[float, float]:
    """The lowest window rate at the largest measured size (any storage), and its backfill creation time."""
    with open(path) as f:
        rows_ = [r for r in json.load(f) if not r.get("error")]
    biggest = max(r["shards"] for r in rows_)
    worst = min((r for r in rows_ if r["shards"] == biggest), key=lambda r: r["window_rate"])
    return worst["window_rate"], worst["backfill_after_s"]


def table(s: Scenario) -> str:
    out = steps(s)
    plan = out.pop()
    f = feed(s)
    lines = [
        f"EXTRAPOLATED (not measured): {s.images:,} images, {s.shards:,} shards of {rows(s):,} rows, "
        f"{s.versions} live versions, dim {s.dim}; plan {plan['plan']} ({plan['reason']})",
        f"{'step':26} {'pool':15} {'hours':>7} {'mem GiB/proc':>12} {'disk GiB':>9}  rule",
        "-" * 110,
    ]
    for r in out:
        mem = r["mem_gib"] if isinstance(r["mem_gib"], str) else "-" if r["mem_gib"] is None else f"{r['mem_gib']:.1f}"
        lines.append(f"{r['step']:26} {r['pool']:15} {r['hours']:7.2f} {mem:>12} {r['disk_gib']:9.0f}  {r['rule']}")
    embed = next(r for r in out if r["step"].startswith("embed"))
    queue = next(r for r in out if r["step"].startswith("queue"))
    # a version end to end: queueing and embedding overlap (runs start as they are queued), the rest is serial
    serial = sum(r["hours"] for r in out if r["step"].startswith(("index", "publish")))
    version_h = max(queue["hours"], embed["hours"]) + serial
    index = sum(r["disk_gib"] for r in out if r["step"] in ("index merge",))
    lines += [
        f"one new version end to end: {version_h:.1f} h (queue and embed overlap: "
        f"{max(queue['hours'], embed['hours']):.1f} h; index build and publish {serial:.1f} h)",
        f"live disk, {s.versions} versions: embeddings {s.versions * embed['disk_gib']:,.0f} GiB + indexes "
        f"{s.versions * index:,.0f} GiB (+ one build's parts and staging, {index:,.0f} GiB, while building)",
        f"feed: the GPU pool consumes {f['consumed_runs_s']:.2f} runs/s, the daemon queues {f['queued_runs_s']:.2f}: "
        f"{'fed' if f['fed'] else 'STARVED'} (rule: consumed <= half the queue rate); start-up is "
        f"{f['start_share']:.0%} of a partition",
        f"shard rows: >= {f['min_rows_queue']:,} for the queue even with no start-up at all, "
        f">= {f['min_rows_overhead']:,} for start-up <= 10%",
    ]
    return "\n".join(lines) + "\n\n" + feed_table(s)
