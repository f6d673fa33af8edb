"""Members of a WebDataset tar vs the same images as objects, fetched by the engine's fetch stage from a real S3.

Starts SeaweedFS on loopback, writes N images of 50 KB as objects and as one tar (a .json member beside each),
then fetches the rows of both manifests with `backfill.reader.fetch_many` over the tasks `BatchReader` makes
(`fetch_tasks`: groups of 16 objects, or one ranged read per tar per chunk), directly and through a proxy that
adds a first-byte latency. Counts the requests; prints a table; a benchmark, not a test.

    .venv/bin/python bench/tar_fetch.py [--images 2048] [--chunk-size 256] [--latency-ms 0 20]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backfill.config import EmbedConfig  # noqa: E402
from backfill.reader import READS_IN_FLIGHT, fetch_many, fetch_tasks  # noqa: E402
from backfill.tar import HEADER, MemberRanges, TarRead, member_uri  # noqa: E402
from harness.local_instance import free_port, wait_for  # noqa: E402
from harness.local_s3 import LocalS3  # noqa: E402

SIZE = 50_000


def make_tar(n: int, payload: bytes) -> tuple[bytes, np.ndarray]:
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for name, data in ((f"{i:07d}.jpg", payload), (f"{i:07d}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                if name.endswith(".jpg"):
                    offsets.append(buf.tell() + HEADER)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), np.array(offsets, np.int64)


def run(uris, todo, members, workers) -> tuple[float, int]:
    tasks = list(fetch_tasks(uris, todo, members))
    requests = sum(1 if isinstance(t, TarRead) else len(t) for t in tasks)
    started = time.perf_counter()
    got = sum(
        len(d) for group in fetch_many(uris, tasks, workers, members=members) for _, d in group if isinstance(d, bytes)
    )
    took = time.perf_counter() - started
    assert got == SIZE * len(uris), f"fetched {got} bytes, expected {SIZE * len(uris)}"
    return len(uris) / took, requests


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=EmbedConfig().chunk_size)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0, 20])
    args = parser.parse_args()
    payload = os.urandom(SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalS3(Path(tmp) / "s3").start()
        try:
            os.environ.update(server.env())
            server.make_bucket("bench")
            fs = server.filesystem()
            fs.pipe({f"bench/img/{i:07d}.jpg": payload for i in range(args.images)}, batch_size=64)
            blob, offsets = make_tar(args.images, payload)
            fs.pipe({"bench/wds/x.tar": blob})
            plain = [f"s3://bench/img/{i:07d}.jpg" for i in range(args.images)]
            tarred = [member_uri("s3://bench/wds/x.tar", f"{i:07d}.jpg") for i in range(args.images)]
            members = MemberRanges(offsets, np.full(args.images, SIZE, np.int64))
            todo = [(s, min(s + args.chunk_size, args.images)) for s in range(0, args.images, args.chunk_size)]
            workers = EmbedConfig().fetch_workers
            print(
                f"{args.images} images of 50 KB on SeaweedFS, chunks of {args.chunk_size}; objects: {workers} "
                f"requests in flight, tar: {READS_IN_FLIGHT}; {os.cpu_count()} CPUs"
            )
            print(f"{'latency':>8} {'objects/s':>10} {'requests':>9} {'tar img/s':>10} {'requests':>9} {'ratio':>6}")
            for latency in args.latency_ms:
                proxy, endpoint = None, server.endpoint_url
                if latency > 0:
                    port = free_port()
                    proxy_py = str(Path(__file__).with_name("latency_proxy.py"))
                    proxy = subprocess.Popen(
                        [sys.executable, proxy_py, str(port), str(server.ports["s3"]), str(latency)]
                    )
                    endpoint = f"http://127.0.0.1:{port}"
                    wait_for(lambda port=port: _listening(port), timeout=10, interval=0.1, what="latency proxy")
                os.environ["BACKFILL_S3_ENDPOINT_URL"] = endpoint
                try:
                    rate_o, req_o = run(plain, todo, None, workers)
                    rate_t, req_t = run(tarred, todo, members, min(workers, READS_IN_FLIGHT))
                finally:
                    if proxy:
                        proxy.terminate()
                        proxy.wait()
                print(
                    f"{latency:>6.0f}ms {rate_o:>10.0f} {req_o:>9} {rate_t:>10.0f} {req_t:>9} {rate_t / rate_o:>5.1f}x"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
