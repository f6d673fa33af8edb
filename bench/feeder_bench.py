"""The feeder alone: embed_shard's reader (fetch, decode, batch assembly, prefetch hand-off) into a no-op model,
at a few fetch/decode worker counts. Prints images/s, seconds per stage and host CPU seconds per image, so a
regression in host-side work shows without a GPU. Not a test.

    .venv/bin/python bench/feeder_bench.py                        # ~1 min of CPU here
    PYTHONPATH=. python3 bench/feeder_bench.py --device cuda --images 16384 --unique 2048 --batch 256 \\
        --grid "fetch=16,decode=4;fetch=32,decode=16"               # the GPU feeder (nvjpeg), no model

fetch/decode/assemble are summed over their threads (wall and CPU time inside the stage's tasks: wall well
above CPU means the threads waited, for the GIL or for a core); wait is the model stage waiting for the
next prepared batch. CPU s/img is the whole process's CPU time per image: the figure least moved by other
load on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backfill import reader as reader_module  # noqa: E402
from backfill.config import EmbedConfig  # noqa: E402
from backfill.feed import Preprocessor  # noqa: E402
from backfill.images import decode, make_fetcher  # noqa: E402
from backfill.pipeline import StageClock, cpu_budget  # noqa: E402
from backfill.preprocess import Preprocess  # noqa: E402
from backfill.reader import BatchReader  # noqa: E402


class Clock:
    """Wall and CPU seconds per stage, summed over threads (a lock: the stages run on many)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            with self._lock:
                self.wall[stage] = self.wall.get(stage, 0.0) + wall
                self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu


@contextmanager
def timed_reader(clock: Clock) -> Iterator[type[BatchReader]]:
    """BatchReader with each stage's tasks timed; the fetch and the batch assembly are wrapped where the
    reader builds them (its module's names, put back after), so the reader's own code runs unchanged."""

    def timed_fetcher():
        fetch = make_fetcher()

        def fetch_timed(uri):
            with clock("fetch"):
                return fetch(uri)

        return fetch_timed

    class TimedPreprocessor(Preprocessor):
        def prepare(self, span):
            with clock("assemble"):
                return super().prepare(span)

    class TimedReader(BatchReader):
        def decode_rows(self, items):
            with clock("decode"):
                return super().decode_rows(items)

    saved = reader_module.make_fetcher, reader_module.Preprocessor
    reader_module.make_fetcher, reader_module.Preprocessor = timed_fetcher, TimedPreprocessor
    try:
        yield TimedReader
    finally:
        reader_module.make_fetcher, reader_module.Preprocessor = saved


def corpus(folder: str, unique: int, side: int, mixed: bool = False) -> list[str]:
    """`unique` synthetic side x side JPEGs (the embed bench's; of many sizes if `mixed`) in a local folder: the
    fake object store."""
    from bench.embed_bench import _jpeg, mixed_size

    paths = []
    for i in range(unique):
        path = os.path.join(folder, f"{i:06d}.jpg")
        width, height = mixed_size(i, side) if mixed else (side, side)
        with open(path, "wb") as f:
            f.write(_jpeg((i, width, height, 90)))
        paths.append(path)
    return paths


def run(uris: list[str], contract: Preprocess, config: EmbedConfig, decode_workers: int) -> dict:
    """One pass of the reader over every row into a no-op model; returns the row of the table."""
    clock = Clock()
    consumer = StageClock({})
    todo = [(s, min(s + config.chunk_size, len(uris))) for s in range(0, len(uris), config.chunk_size)]
    images = rejects = 0
    with timed_reader(clock) as Reader:
        cpu, began = time.process_time(), time.perf_counter()
        reader = Reader(uris, todo, contract, config, decode_workers)
        try:
            while True:
                with consumer("wait"):
                    batch = next(reader, None)
                if batch is None:
                    break
                span, (pixels, failed) = batch
                images += 0 if pixels is None else int(pixels.shape[0])  # the no-op model: count the rows
                rejects += len(span.rejects) + len(failed)
        finally:
            reader.close()
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    return {
        "images": images,
        "rejects": rejects,
        "img_s": images / wall,
        "cpu_per_img": cpu / max(1, images),
        "wall": clock.wall,
        "cpu": clock.cpu,
        "wait": consumer.totals.get("wait", 0.0),
        "seconds": wall,
    }


def _decode_chunk(args: tuple[list[bytes], int]) -> int:
    blobs, size = args
    for blob in blobs:
        decode(blob, size, 64_000_000)
    return len(blobs)


def pool_probe(paths: list[str], size: int, workers: int, rounds: int = 3) -> None:
    """Is the GIL visible? The same decode (groups of 16, like the reader's) on 1 thread, `workers` threads and
    `workers` processes (bytes pickled over, as a process-pool decode stage would); best img/s of `rounds`."""
    blobs = []
    for path in paths:
        with open(path, "rb") as f:
            blobs.append(f.read())
    groups = [(blobs[i : i + 16], size) for i in range(0, len(blobs), 16)]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, pool in (
            ("1 thread", None),
            (f"{workers} threads", ThreadPoolExecutor(workers)),
            (f"{workers} processes", ProcessPoolExecutor(workers)),
        ):
            if pool is not None:
                list(pool.map(_decode_chunk, groups[:workers]))  # start the workers first
            began = time.perf_counter()
            done = sum(map(_decode_chunk, groups) if pool is None else pool.map(_decode_chunk, groups))
            best[name] = max(best.get(name, 0.0), done / (time.perf_counter() - began))
            if pool is not None:
                pool.shutdown()
    print(f"decode pool probe (img/s, best of {rounds}): " + "; ".join(f"{k} {v:.0f}" for k, v in best.items()))


def _stage(row: dict, key: str) -> str:
    return f"{row['wall'].get(key, 0):6.2f}/{row['cpu'].get(key, 0):6.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=1536, help="rows read (they repeat the unique files)")
    p.add_argument("--unique", type=int, default=128, help="distinct JPEG files")
    p.add_argument("--side", type=int, default=512, help="JPEG width and height")
    p.add_argument("--mixed", action="store_true", help="JPEGs of many sizes around --side (embed_bench.mixed_size)")
    p.add_argument("--size", type=int, default=224, help="model input size")
    p.add_argument("--contract", choices=("bare", "squash", "resize_crop", "pad"), default="bare")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--grid",
        default="fetch=4,decode=1;fetch=4,decode=2;fetch=16,decode=4",
        help="';'-separated settings of fetch, decode, prefetch, assemble (batch-assembly threads, default 1) and "
        "decoder (the GPU JPEG decoder on CUDA: torchvision or nvimgcodec)",
    )
    p.add_argument("--repeat", type=int, default=1, help="passes per setting; each keeps its best images/s")
    p.add_argument("--no-gpu-decode", action="store_true")
    p.add_argument("--out", default="", help="folder for feeder_bench_<device>.json (default: none)")
    p.add_argument("--pool-probe", type=int, default=0, metavar="N", help="also decode on N threads vs N processes")
    args = p.parse_args(argv)
    contract = Preprocess.of(args.size) if args.contract == "bare" else Preprocess(args.size, args.contract)
    folder = tempfile.mkdtemp(prefix="feeder-bench-")
    try:
        files = corpus(folder, args.unique, args.side, args.mixed)
        uris = [files[i % len(files)] for i in range(args.images)]
        print(
            f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC device={args.device} cpus={cpu_budget()} "
            f"load={os.getloadavg()[0]:.1f} rows={args.images} unique={args.unique} "
            f"side={args.side}{' mixed' if args.mixed else ''} "
            f"contract={contract.describe()} batch={args.batch} no-op model"
        )
        head = (
            f"{'setting':30} {'img/s':>8} {'CPU s/img':>10} {'fetch s':>13} {'decode s':>13} {'assemble s':>13} "
            f"{'wait s':>7} {'rejects':>7}"
        )
        print(head + "\n" + " " * 54 + "(wall / CPU, summed over threads)\n" + "-" * len(head))
        results = {}
        for setting in filter(None, args.grid.split(";")):
            knobs = dict(pair.split("=") for pair in setting.split(","))
            config = EmbedConfig(
                batch_size=args.batch,
                chunk_size=max(1024, args.batch),
                device=args.device,
                fetch_workers=int(knobs.get("fetch", 4)),
                decode_workers=int(knobs.get("decode", 1)),
                gpu_decode=not args.no_gpu_decode,
                prefetch_batches=int(knobs.get("prefetch", EmbedConfig.prefetch_batches)),
                assembly_workers=int(knobs.get("assemble", 1)),
                gpu_decoder=knobs.get("decoder", "torchvision"),
            )
            best = None
            for _ in range(args.repeat):
                row = run(uris, contract, config, config.decode_workers)
                best = row if best is None or row["img_s"] > best["img_s"] else best
            assert best is not None
            print(
                f"{setting:30} {best['img_s']:8.1f} {best['cpu_per_img'] * 1000:8.2f}ms {_stage(best, 'fetch'):>13} "
                f"{_stage(best, 'decode'):>13} {_stage(best, 'assemble'):>13} {best['wait']:7.2f} {best['rejects']:7d}"
            )
            results[setting] = best
            if best["images"] + best["rejects"] != args.images:
                print(f"  rows lost: {best['images']} + {best['rejects']} rejects != {args.images}")
                return 1
        if args.pool_probe:
            pool_probe(files, args.size, args.pool_probe)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"feeder_bench_{args.device.replace(':', '')}.json"), "w") as f:
                json.dump(results, f, indent=2)
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
