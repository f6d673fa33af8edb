"""Manifest-to-searchable latency on the local default: the real dagster-daemon and `backfill serve`.

The sample corpus is generated with some shards held back; v1 is registered and published by the
daemon; then each held-back manifest lands, one at a time, and the clock runs until its images are
found through the HTTP API (GET /search?image_id=...). Prints one row per shard and the settings.

    .venv/bin/python scripts/nearline_latency.py [--land 2] [--sensor-interval 5] [--automation-interval 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backfill.embed import MARKER  # noqa: E402
from backfill.manifest import read_shard, write_shard  # noqa: E402
from backfill.models import REFERENCE, torchscript_bytes  # noqa: E402
from backfill.publish import read_pointer  # noqa: E402
from backfill.registry import register_version  # noqa: E402
from backfill.sample import SampleSpec, make_sample_corpus  # noqa: E402
from backfill.storage import Layout, Store  # noqa: E402
from backfill.settings import DEFAULT_MODEL  # noqa: E402
from harness.local_instance import free_port, new_instance, start_daemon, start_search_service, stop, wait_for  # noqa: E402

MODEL = DEFAULT_MODEL


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} CPUs ({cpu}), load average {os.getloadavg()[0]:.1f} at the end, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--land", type=int, default=2, help="shards held back and landed one at a time")
    parser.add_argument("--sensor-interval", type=int, default=5, help="BACKFILL_SENSOR_INTERVAL (production default 30)")
    parser.add_argument("--automation-interval", type=int, default=5, help="BACKFILL_AUTOMATION_INTERVAL (production default 30)")
    parser.add_argument("--workdir", help="keep data and the Dagster instance here (default: a temporary folder)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="nearline-"))
    root, home = work / "root", work / "dagster_home"
    shutil.rmtree(work, ignore_errors=True)
    env = new_instance(
        home,
        root,
        args.sensor_interval,
        BACKFILL_MODEL=MODEL,
        BACKFILL_AUTOMATION_INTERVAL=str(args.automation_interval),
    )
    layout = Layout(Store.open(str(root)))
    made = make_sample_corpus(layout, SampleSpec(images=args.images, shards=args.shards))
    held = {}
    for s in range(args.shards - args.land, args.shards):
        name = f"shard-{s:05d}"
        held[name] = pq.read_table(layout.manifest(name))
        layout.store.rm(layout.manifest(name))
    print(f"corpus: {made['images']} images in {args.shards} shards; {len(held)} held back to land one at a time; work folder {work}")

    daemon = start_daemon(env, work / "daemon.log")
    port = free_port()
    service = start_search_service(env, work / "serve.log", port, poll_s=0.2)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        arch = REFERENCE["v1"]
        started = time.monotonic()
        register_version(layout, MODEL, "v1", torchscript_bytes(arch), dim=arch.dim, input_size=arch.input_size)
        pointer = wait_for(lambda: read_pointer(layout, MODEL), timeout=900, interval=1, what=f"v1 published (see {work}/daemon.log)")
        print(f"v1 published over {pointer['vectors']} vectors ({pointer['index_type']}) in {time.monotonic() - started:.0f}s")

        for name, table in held.items():
            before = read_pointer(layout, MODEL)["build_id"]
            marker = f"{layout.embeddings(MODEL, 'v1', name)}/{MARKER}"
            t0 = time.monotonic()
            write_shard(layout, name, table)
            first_id = int(read_shard(layout, name).image_ids[0])
            marks: dict[str, float] = {}
            while True:
                now = time.monotonic() - t0
                if "embedded" not in marks and layout.store.exists(marker):
                    marks["embedded"] = now
                if "published" not in marks and read_pointer(layout, MODEL)["build_id"] != before:
                    marks["published"] = now
                r = requests.get(f"{url}/search", params={"image_id": first_id, "k": 1}, timeout=30)
                if r.status_code == 200:
                    marks["searchable"] = now
                    break
                if now > 900 or daemon.poll() is not None:
                    raise SystemExit(f"{name} not searchable after {now:.0f}s; see {work}/daemon.log")
                time.sleep(0.2)
            build = read_pointer(layout, MODEL)
            rows.append((name, len(table), marks.get("embedded", float("nan")), marks.get("published", float("nan")), marks["searchable"], build["index_type"], build["vectors"]))
    finally:
        stop(service)
        stop(daemon)

    print(f"\nintervals: registry sensor {args.sensor_interval}s, automation sensors {args.automation_interval}s, "
          "backfill daemon loop 30s (Dagster's), run queue dequeue 2s, service poll 0.2s")
    print(f"machine: {machine()}\n")
    print(f"{'shard':<12} {'images':>6} {'embedded s':>10} {'published s':>11} {'searchable s':>12}  index after")
    for name, n, emb, pub, found, kind, vectors in rows:
        print(f"{name:<12} {n:>6} {emb:>10.1f} {pub:>11.1f} {found:>12.1f}  {kind}, {vectors} vectors")


if __name__ == "__main__":
    main()
