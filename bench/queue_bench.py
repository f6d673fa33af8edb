"""What the real backfill daemon sustains: runs queued per second for one backfill of image_embeddings over N shard
partitions, automation tick times and the UI's partition-status query, on SQLite or on PostgreSQL.

Isolation: the project's dagster.yaml with `max_concurrent_runs: 0`, so queued runs never start and only the
daemon's own work (sensors, automation, backfill iterations) is measured. The partitions are added with
`instance.add_dynamic_partitions` (what the registry sensor requests), model_version[v1] is reported
materialized (what its verification step records), and the product's `backfill_automation` sensor, in the real
`dagster-daemon`, launches the backfill; the bench only watches.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from harness.local_instance import REPO, free_port, init_instance, start_daemon, start_webserver, stop, wait_for
from harness.local_postgres import Server

ASSET, VERSION = "image_embeddings", "v1"
BACKFILL_TAG = "dagster/backfill"

# what the asset page asks for a partitioned asset (the partition health bar and its counts)
PARTITION_STATUS = """
{ assetNodes(assetKeys: [{path: ["image_embeddings"]}]) {
    partitionStats { numMaterialized numMaterializing numFailed numPartitions }
    assetPartitionStatuses { __typename ... on MultiPartitionStatuses { primaryDimensionName ranges {
        primaryDimStartKey primaryDimEndKey secondaryDim { __typename ... on DefaultPartitionStatuses {
            materializedPartitions failedPartitions materializingPartitions unmaterializedPartitions } } } } }
} }
"""
# the Overview -> Backfills page
BACKFILLS = """
{ partitionBackfillsOrError(limit: 10) { __typename ... on PartitionBackfills { results {
    id status numPartitions isAssetBackfill
    assetBackfillData { assetBackfillStatuses { __typename
      ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted numPartitionsInProgress } } }
} } } }
"""
TICKS = """
{ sensorOrError(sensorSelector: {repositoryLocationName: "ops.definitions:defs", repositoryName: "__repository__",
    sensorName: "%s"}) { __typename ... on PythonError { message } ... on SensorNotFoundError { message }
    ... on Sensor { sensorState { ticks(limit: 200) { timestamp endTimestamp status } } } } }
"""
SENSORS = ("backfill_automation", "index_automation")


@dataclass
class QueueResult:
    storage: str
    shards: int
    add_partitions_s: float = 0.0
    backfill_after_s: float = 0.0  # daemon start -> the backfill exists
    first_run_after_s: float = 0.0  # daemon start -> its first run exists
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s since the first run, runs queued)
    ticks: dict[str, list[float]] = field(default_factory=dict)  # sensor -> tick durations (s), oldest first
    queries: dict[str, list[float]] = field(default_factory=dict)  # query -> seconds per repeat
    targeted: int = 0  # partitions the backfill targets (the UI's count): every shard, or the bench is wrong
    started: int = 0  # runs that left the queue (must be 0: the window measures queueing alone)
    load: float = 0.0  # 1-minute load average at the end of the window (this box is shared)
    daemon_peak_mib: float = 0.0  # the daemon and its children (code server), summed, at the samples
    error: str = ""

    def rate(self, start: float, end: float) -> float:
        """Runs per second between two moments of the window (s after the first run)."""
        inside = [(t, n) for t, n in self.samples if start <= t <= end]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            return float("nan")
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def summary(self, early_s: float = 30.0) -> dict:
        last_t, last_n = self.samples[-1] if self.samples else (0.0, 0)
        return {
            "storage": self.storage,
            "shards": self.shards,
            "add_partitions_s": round(self.add_partitions_s, 2),
            "backfill_after_s": round(self.backfill_after_s, 1),
            "first_run_after_s": round(self.first_run_after_s, 1),
            "targeted": self.targeted,
            "started": self.started,
            "runs": last_n,
            "window_s": round(last_t, 1),
            "start_rate": round(self.rate(0, early_s), 2),
            "window_rate": round(last_n / last_t, 2) if last_t else float("nan"),
            "end_rate": round(self.rate(max(0.0, last_t - early_s), last_t), 2),
            "daemon_peak_mib": round(self.daemon_peak_mib),
            "load": round(self.load, 1),
            "ticks": {s: _stats(d) for s, d in self.ticks.items()},
            "queries": {q: _stats(d) for q, d in self.queries.items()},
            "error": self.error,
        }


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    return {"n": len(values), "first": round(values[0], 2), "median": round(statistics.median(values), 2),
            "max": round(max(values), 2)}  # fmt: skip


def tree_rss_mib(root_pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc), in MiB."""
    parents: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended while we looked
        parents.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21])  # pages
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(parents.get(pid, []))
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_home(home: Path, postgres: Server | None) -> None:
    """The project's dagster.yaml, with no run slots (queued runs never start) and, optionally, PostgreSQL storage."""
    config = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    config.setdefault("concurrency", {}).setdefault("runs", {})["max_concurrent_runs"] = 0
    config.pop("run_monitoring", None)  # nothing runs, so nothing to monitor (and no monitoring reads in the way)
    if postgres is not None:
        config["storage"] = postgres.dagster_storage()
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    init_instance(home)


def empty_root(root: Path) -> None:
    """A data root with no manifests and no registry: the registry sensor finds nothing to add or retire."""
    (root / "corpus" / "manifests").mkdir(parents=True)
    (root / "registry").mkdir(parents=True)


def seed(home: Path, shards: int) -> float:
    """The partitions (as the registry sensor adds them) and model_version[v1] verified; returns seconds spent."""
    from dagster import AssetMaterialization, DagsterInstance

    names = [f"shard-{i:06d}" for i in range(shards)]
    began = time.perf_counter()
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("model_version", [VERSION])
        instance.add_dynamic_partitions("shard", names)
        took = time.perf_counter() - began
        # what the model_version step records once the version is verified: the shards may now be embedded
        instance.report_runless_asset_event(AssetMaterialization("model_version", partition=VERSION))
    return took


class GraphQL:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def up(self) -> bool:
        try:
            return requests.get(f"{self.base}/server_info", timeout=5).ok
        except requests.ConnectionError:
            return False

    def __call__(self, query: str) -> tuple[dict, float]:
        began = time.perf_counter()
        response = requests.post(f"{self.base}/graphql", json={"query": query}, timeout=300)
        took = time.perf_counter() - began
        response.raise_for_status()
        body = response.json()
        if "errors" in body:
            raise RuntimeError(f"GraphQL error: {json.dumps(body['errors'])[:500]}")
        return body["data"], took


def tick_durations(graphql: GraphQL, sensor: str) -> list[float]:
    data, _ = graphql(TICKS % sensor)
    if data["sensorOrError"]["__typename"] != "Sensor":
        raise RuntimeError(f"sensor {sensor}: {data['sensorOrError']}")
    ticks = data["sensorOrError"]["sensorState"]["ticks"]
    done = [t for t in ticks if t["endTimestamp"]]
    return [t["endTimestamp"] - t["timestamp"] for t in sorted(done, key=lambda t: t["timestamp"])]


def measure(
    storage: str,
    shards: int,
    work: Path,
    postgres: Server | None = None,
    window_s: float = 90.0,
    max_runs: int = 0,
    startup_timeout_s: float = 300.0,
    repeats: int = 3,
    interval_s: int = 30,
) -> QueueResult:
    """One case: a fresh instance and root under `work`, the daemon and the webserver started and stopped here."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    result = QueueResult(storage, shards)
    home, root = work / "dagster_home", work / "root"
    make_home(home, postgres)
    empty_root(root)
    result.add_partitions_s = seed(home, shards)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "BACKFILL_ROOT": str(root),
        "BACKFILL_SENSOR_INTERVAL": "3600",  # nothing to discover; its first tick still runs
        "BACKFILL_AUTOMATION_INTERVAL": str(interval_s),
    }
    port = free_port()
    web = start_webserver(env, work / "webserver.log", port)
    graphql = GraphQL(port)
    daemon = None
    try:
        wait_for(graphql.up, timeout=startup_timeout_s, what="dagster-webserver")
        with DagsterInstance.from_config(str(home)) as instance:
            started = time.monotonic()
            daemon = start_daemon(env, work / "daemon.log")
            backfill = wait_for(lambda: instance.get_backfills(), startup_timeout_s, 0.5, "the backfill")[0]
            result.backfill_after_s = time.monotonic() - started
            mine = RunsFilter(tags={BACKFILL_TAG: backfill.backfill_id})
            wait_for(lambda: instance.get_runs_count(mine), startup_timeout_s, 0.5, "the first run")
            first = time.monotonic()
            result.first_run_after_s = first - started
            limit = max_runs or shards
            while True:
                count = instance.get_runs_count(mine)
                result.samples.append((time.monotonic() - first, count))
                result.daemon_peak_mib = max(result.daemon_peak_mib, tree_rss_mib(daemon.pid))
                if count >= limit or time.monotonic() - first >= window_s:
                    result.load = os.getloadavg()[0]
                    # NOT_STARTED: a run the daemon is submitting at this instant (created, not yet queued)
                    waiting = (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED)
                    left = [status for status in DagsterRunStatus if status not in waiting]
                    result.started = instance.get_runs_count(RunsFilter(tags=mine.tags, statuses=left))
                    break
                time.sleep(1.0)
        for sensor in SENSORS:
            result.ticks[sensor] = tick_durations(graphql, sensor)
        # the UI's queries with the daemon stopped: their own cost, not the daemon's contention on 2 cores
        stop(daemon)
        daemon = None
        for name, query in (("partition_status", PARTITION_STATUS), ("backfills_page", BACKFILLS)):
            result.queries[name] = [graphql(query)[1] for _ in range(repeats)]
        page, _ = graphql(BACKFILLS)
        result.targeted = sum(b["numPartitions"] or 0 for b in page["partitionBackfillsOrError"]["results"])
    except (TimeoutError, RuntimeError, requests.RequestException) as exc:
        result.error = str(exc)[:200]
    finally:
        if daemon is not None:
            stop(daemon)
        stop(web)
    return result


def run_case(storage: str, shards: int, **kwargs) -> dict:
    """measure() in a temporary folder, with a PostgreSQL server of its own for storage='postgres'."""
    from harness.local_postgres import running_postgres

    with tempfile.TemporaryDirectory(prefix=f"queue-bench-{storage}-{shards}-") as folder:
        if storage == "postgres":
            with running_postgres() as server:
                return measure(storage, shards, Path(folder), server, **kwargs).summary()
        return measure(storage, shards, Path(folder), **kwargs).summary()
