"""Small-object fetch from a real S3 server: one GET at a time vs the engine's fetch stage, same run.

Starts SeaweedFS on loopback, writes N objects of 50 KB, then fetches them sequentially and
with `backfill.images.fetch_many` in the groups `embed_shard` uses, directly and through a proxy
that adds a first-byte latency like a remote region's (loopback answers in ~1 ms, so alone it
only measures CPU). Prints a table; a benchmark, not a test.

    .venv/bin/python bench/s3_fetch.py [--objects 1000] [--latency-ms 0 20 50] [--workers 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backfill.config import EmbedConfig  # noqa: E402
from backfill.images import make_fetcher  # noqa: E402
from backfill.reader import STAGE_GROUP, fetch_many, grouped  # noqa: E402
from harness.local_instance import free_port, wait_for  # noqa: E402
from harness.local_s3 import LocalS3  # noqa: E402


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds else float("nan")


def sequential(uris: list[str]) -> float:
    fetch = make_fetcher()
    started = time.perf_counter()
    for uri in uris:
        fetch(uri)
    return _rate(len(uris), time.perf_counter() - started)


def engine(uris: list[str], workers: int) -> float:
    started = time.perf_counter()
    groups = grouped(range(len(uris)), STAGE_GROUP)
    got = sum(len(data) for group in fetch_many(uris, groups, workers) for _, data in group if isinstance(data, bytes))
    assert got == 50_000 * len(uris), "the engine fetched the wrong bytes"
    return _rate(len(uris), time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--sequential-objects", type=int, default=200, help="fetched one at a time (slow with latency)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0, 20, 50])
    parser.add_argument("--workers", type=int, default=EmbedConfig().fetch_workers)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = LocalS3(Path(tmp) / "s3").start()
        try:
            os.environ.update(server.env())
            server.make_bucket("bench")
            fs = server.filesystem()
            payload = os.urandom(50_000)  # incompressible, the size of a web JPEG thumbnail
            fs.pipe({f"bench/img/{i:07d}.jpg": payload for i in range(args.objects)}, batch_size=64)
            uris = [f"s3://bench/img/{i:07d}.jpg" for i in range(args.objects)]
            print(f"{args.objects} objects of 50 KB on SeaweedFS at {server.endpoint_url}; engine: fetch_many, {args.workers} in flight; {os.cpu_count()} CPUs")
            print(f"{'latency':>8} {'sequential/s':>13} {'engine/s':>9} {'ratio':>6} {'MB/s':>6}")
            for latency in args.latency_ms:
                proxy = None
                endpoint = server.endpoint_url
                if latency > 0:
                    port = free_port()
                    proxy = subprocess.Popen([sys.executable, str(Path(__file__).with_name("latency_proxy.py")), str(port), str(server.ports["s3"]), str(latency)])
                    endpoint = f"http://127.0.0.1:{port}"
                    wait_for(lambda: _listening(port), timeout=10, interval=0.1, what="latency proxy")
                os.environ["BACKFILL_S3_ENDPOINT_URL"] = endpoint
                try:
                    seq = sequential(uris[: args.sequential_objects])
                    eng = engine(uris, args.workers)
                finally:
                    if proxy:
                        proxy.terminate()
                        proxy.wait()
                print(f"{latency:>6.0f}ms {seq:>13.0f} {eng:>9.0f} {eng / seq:>5.1f}x {eng * 0.05:>6.1f}", flush=True)
        finally:
            server.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    main()
