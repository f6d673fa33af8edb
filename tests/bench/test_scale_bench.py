"""The scale bench's arithmetic and instance set-up (fast; the daemon and PostgreSQL runs are the bench itself)."""

import json
import math
import os
from pathlib import Path

import yaml

from bench.extrapolate import MEASURED, Scenario, feed, from_queue_json, steps, table
from bench.local_postgres import Server
from bench.queue_bench import QueueResult, make_home, tree_rss_mib


def test_queue_rates_from_samples():
    r = QueueResult("sqlite", 1000, samples=[(0.0, 1), (10.0, 21), (20.0, 41), (40.0, 61)])
    assert r.rate(0, 20) == 2.0
    assert r.rate(20, 40) == 1.0
    assert math.isnan(r.rate(50, 60))
    summary = r.summary(early_s=20)
    assert summary["runs"] == 61 and summary["window_rate"] == round(61 / 40, 2)
    assert summary["start_rate"] == 2.0 and summary["end_rate"] == 1.0


def test_the_bench_instance_has_no_run_slots_and_the_given_storage(tmp_path):
    make_home(tmp_path / "home", None)
    config = yaml.safe_load((tmp_path / "home" / "dagster.yaml").read_text())
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == 0  # queued runs never start
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"  # the rest is the project's
    assert "storage" not in config  # SQLite under DAGSTER_HOME
    storage = Server("127.0.0.1", 5999, "dagster", "dagster").dagster_storage()["postgres"]["postgres_db"]
    assert storage["port"] == 5999 and storage["scheme"] == "postgresql+psycopg2"


def test_tree_rss_counts_this_process():
    assert tree_rss_mib(os.getpid()) > 10


def test_feed_arithmetic():
    s = Scenario(gpu_pods=10, gpu_img_s=1000.0, shards=1000, images=10_000_000, pod_start_s=6.4, runs_per_s=2.0)
    f = feed(s)
    partition_s = 10_000 / 1000 + MEASURED["run_overhead_s"] + 6.4  # 20 s
    assert math.isclose(f["consumed_runs_s"], 10 / partition_s)
    assert f["fed"] and f["min_rows_queue"] == 10_000  # 10 pods x 1000 img/s at 1 run/s
    assert f["min_rows_overhead"] == 100_000  # start-up 10 s, 10% of 100 s of compute


def test_the_extrapolation_uses_the_product_plan_and_says_so():
    rows = steps(Scenario())
    plan = rows.pop()
    assert plan["plan"].startswith("IVF65536,PQ")
    queue = next(r for r in rows if r["step"].startswith("queue"))
    assert math.isclose(queue["hours"], (15.0 + 10_000 / 2.0) / 3600)
    assert table(Scenario()).startswith("EXTRAPOLATED")


def test_queue_json_gives_the_slowest_rate_at_the_largest_size(tmp_path):
    results = [
        {"shards": 1000, "window_rate": 1.0, "backfill_after_s": 5},
        {"shards": 30000, "window_rate": 2.5, "backfill_after_s": 20},
        {"shards": 30000, "window_rate": 1.5, "backfill_after_s": 30},
        {"shards": 30000, "error": "timed out"},
    ]
    path = tmp_path / "queue.json"
    path.write_text(json.dumps(results))
    assert from_queue_json(str(path)) == (1.5, 30)


def test_a_queue_row_has_a_cell_per_column(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))  # a script, not a package
    import scale_bench

    r = QueueResult("postgres", 3, samples=[(0.0, 1), (2.0, 3)], targeted=3)
    r.ticks = {"backfill_automation": [0.5, 0.7], "index_automation": [0.2]}
    r.queries = {"partition_status": [0.1], "backfills_page": [0.05]}
    row = scale_bench.queue_row(r.summary())
    assert len(row.split(" | ")) == len(scale_bench.QUEUE_HEADER)
    assert row.startswith("postgres | 3 | 3 | 0 |")
    failed = scale_bench.queue_row(QueueResult("sqlite", 3, error="timed out").summary())
    assert "error: timed out" in failed
