"""The search service under concurrent load, on loopback: req/s, p50/p99 latency, errors, a CURRENT swap mid-run,
and an overload that must be refused fast.

`backfill serve` runs for real (uvicorn, the CLI's own flags, a bearer token) over a small published index built by
the engine (the tests' tiny model, so the numbers are the service's machinery, not a large model's forward
pass). Each row runs N client threads, each alternating search-by-id (GET) and search-by-upload (POST of a
corpus JPEG), for at most --seconds and --max-requests; halfway through, the other of two builds is published
and the row says whether answers came from both. The overload row starts a second server with one search slot
and two queue places and fires --overload-clients at it: the 503s' own latency is the point.

    flock /tmp/heavy.lock timeout 600 .venv/bin/python bench/service_load.py
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from backfill.config import EmbedConfig, IndexConfig  # noqa: E402 (after the sys.path line)
from backfill.embed import embed_shard  # noqa: E402
from backfill.incremental import build_or_update  # noqa: E402
from backfill.manifest import list_shards, read_shard, write_shard  # noqa: E402
from backfill.publish import publish  # noqa: E402
from backfill.runtime import load_model  # noqa: E402
from harness.local_instance import REPO, free_port, start, stop  # noqa: E402
from tests.conftest import MODEL, make_layout, register_tiny  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Row:
    clients: int
    latencies: dict[object, list[float]] = field(default_factory=dict)  # status -> seconds
    builds: Counter = field(default_factory=Counter)  # build_id of each 200
    seconds: float = 0.0
    swapped_to: str | None = None

    def add(self, status: object, seconds: float, build: str | None) -> None:
        self.latencies.setdefault(status, []).append(seconds)
        if build:
            self.builds[build] += 1

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())


def prepare(root: Path, images: int) -> tuple[object, list[str], list[tuple[int, bytes]]]:
    """A corpus, the tiny v1, build A over two shards (published) and build B with the third (not yet)."""
    layout = make_layout(root, images=images, shards=3)
    card = register_tiny(layout, "v1")
    held_name = list_shards(layout)[-1]
    held = pq.read_table(layout.manifest(held_name))
    layout.store.rm(layout.manifest(held_name))
    model = load_model(layout, card)
    config = EmbedConfig(batch_size=32, chunk_size=64, torch_threads=1)
    for shard in list_shards(layout):
        embed_shard(layout, shard, model, config)
    first = build_or_update(layout, MODEL, "v1", list_shards(layout), IndexConfig()).build
    publish(layout, MODEL, first.build_id)
    write_shard(layout, held_name, held)
    embed_shard(layout, held_name, model, config)
    second = build_or_update(layout, MODEL, "v1", list_shards(layout), IndexConfig()).build
    queries = []
    for shard in list_shards(layout)[:-1]:  # ids in both builds
        s = read_shard(layout, shard)
        for row in range(0, len(s.uris), 7):
            with open(s.uris[row], "rb") as f:
                queries.append((int(s.image_ids[row]), f.read()))
    return layout, [first.build_id, second.build_id], queries


def serve(root: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "BACKFILL_SERVICE_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "backfill.cli", "--root", str(root), "--model", MODEL, "serve"]
    proc = start([*cmd, "--port", str(port), "--poll-s", "0.2", *flags], env, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"the service did not start: {log.read_text()[-2000:]}")


def client(url: str, queries, row: Row, lock: threading.Lock, until: float, budget: list[int], seed: int) -> None:
    rng, session, turn = random.Random(seed), requests.Session(), seed
    while time.monotonic() < until:
        with lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        image_id, data = rng.choice(queries)
        turn += 1
        began = time.perf_counter()
        try:
            if turn % 2:
                r = session.get(f"{url}/search", params={"image_id": image_id, "k": 10}, headers=AUTH, timeout=60)
            else:
                headers = {**AUTH, "Content-Type": "image/jpeg"}
                r = session.post(f"{url}/search", params={"k": 10}, data=data, headers=headers, timeout=60)
            status, build = r.status_code, (r.json().get("build_id") if r.status_code == 200 else None)
        except requests.RequestException as exc:
            status, build = type(exc).__name__, None
        with lock:
            row.add(status, time.perf_counter() - began, build)


def run_row(url, queries, clients: int, seconds: float, max_requests: int, swap=None) -> Row:
    row, lock, budget = Row(clients), threading.Lock(), [max_requests]
    began = time.monotonic()
    until = began + seconds
    threads = [
        threading.Thread(target=client, args=(url, queries, row, lock, until, budget, i)) for i in range(clients)
    ]
    for t in threads:
        t.start()
    if swap is not None:  # halfway, by time or by requests, whichever comes first
        while time.monotonic() < began + seconds / 2 and budget[0] > max_requests / 2:
            time.sleep(0.01)
        row.swapped_to = swap()
    for t in threads:
        t.join()
    row.seconds = time.monotonic() - began
    return row


def ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.1f}" if values else "-"


def table(rows: list[Row], overload: Row) -> str:
    lines = [
        "| clients | requests | req/s | p50 ms | p99 ms | errors by status | answers per build | swap seen |",
        "|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        ok = row.latencies.get(200, [])
        errors = {s: len(v) for s, v in row.latencies.items() if s != 200}
        per_build = ", ".join(f"{b[-6:]}: {n}" for b, n in sorted(row.builds.items()))
        seen = len(row.builds) == 2 and row.swapped_to in row.builds
        lines.append(
            f"| {row.clients} | {row.requests} | {row.requests / row.seconds:.0f} | {ms(ok, 50)} | {ms(ok, 99)} "
            f"| {errors or 0} | {per_build} | {'yes' if seen else 'NO'} |"
        )
    statuses = {s: len(v) for s, v in overload.latencies.items()}
    refused = overload.latencies.get(503, [])
    lines += [
        "",
        "| overload: clients | requests | req/s | statuses | 200 p50 / p99 ms | 503 p50 / p99 ms |",
        "|---:|---:|---:|---|---|---|",
        f"| {overload.clients} | {overload.requests} | {overload.requests / overload.seconds:.0f} | {statuses} "
        f"| {ms(overload.latencies.get(200, []), 50)} / {ms(overload.latencies.get(200, []), 99)} "
        f"| {ms(refused, 50)} / {ms(refused, 99)} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="client threads per row (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0, help="most seconds per row (default %(default)s)")
    parser.add_argument("--max-requests", type=int, default=3000, help="most requests per row (default %(default)s)")
    parser.add_argument("--images", type=int, default=240, help="corpus size (default %(default)s)")
    parser.add_argument("--overload-clients", type=int, default=32)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if not (1 <= len(counts) <= 6 and all(1 <= c <= 128 for c in counts)) or not 1 <= args.seconds <= 60:
        raise SystemExit("--clients: 1 to 6 counts of 1..128; --seconds: 1..60 (the run stays bounded)")
    with tempfile.TemporaryDirectory(prefix="service-load-") as tmp:
        tmp = Path(tmp)
        began = time.monotonic()
        layout, builds, queries = prepare(tmp / "root", args.images)
        print(f"prepared {args.images} images, builds {builds} in {time.monotonic() - began:.1f} s", flush=True)
        proc, url = serve(tmp / "root", tmp / "serve.log")
        rows = []
        try:
            for i, clients in enumerate(counts):
                target = builds[(i + 1) % 2]  # the build not serving now

                def swap(target=target) -> str:
                    assert publish(layout, MODEL, target).published
                    return target

                rows.append(run_row(url, queries, clients, args.seconds, args.max_requests, swap))
                print(f"{clients} clients: {rows[-1].requests} requests", flush=True)
        finally:
            stop(proc)
        flags = ("--max-in-flight", "1", "--max-queued", "2", "--queue-wait-s", "0.05")
        proc, url = serve(tmp / "root", tmp / "overload.log", *flags)
        try:
            overload = run_row(url, queries, args.overload_clients, min(args.seconds, 5.0), args.max_requests)
        finally:
            stop(proc)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"overload server: {' '.join(flags)}; the others: the defaults\n")
    print(table(rows, overload))


if __name__ == "__main__":
    main()
