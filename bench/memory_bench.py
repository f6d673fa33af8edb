"""Peak RSS of a partition process (embed_shard in a fresh process) for shards of growing size; should be flat.

    .venv/bin/python bench/memory_bench.py --sizes 1000,50000 --model refcnn-v1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS), or its peak (VmHWM: per address space, so unlike
    getrusage's ru_maxrss it does not inherit the parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(root: str, model: str, batch: int, chunk: int) -> None:
    """One partition, as a step process runs it: load the model, embed the shard, report memory."""
    from backfill.config import EmbedConfig
    from backfill.embed import embed_shard
    from backfill.registry import read_card
    from backfill.runtime import load_model
    from backfill.storage import Layout, Store

    layout = Layout(Store.open(root))
    loaded = load_model(layout, read_card(layout, model, "bench"))
    before = rss_mib()
    began = time.perf_counter()
    stats = embed_shard(layout, "bench", loaded, EmbedConfig(batch_size=batch, chunk_size=chunk))
    peak = rss_mib("VmHWM")
    print(json.dumps({"images": stats.images, "rss_after_load_mib": before, "peak_rss_mib": peak, "end_rss_mib": rss_mib(),
                      "wall_s": time.perf_counter() - began, "images_per_s": stats.images_per_s}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,50000")
    p.add_argument("--model", default="refcnn-v1")
    p.add_argument("--unique", type=int, default=500, help="distinct JPEGs; rows repeat them")
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.model, args.batch, args.chunk)
        return 0

    import embed_bench
    from backfill.registry import register_version
    from backfill.storage import Layout, Store

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        root = tempfile.mkdtemp(prefix="memory-bench-")
        try:
            layout = Layout(Store.open(root))
            embed_bench.make_corpus(layout, size, min(size, args.unique), args.side)
            dim, input_size = embed_bench.MODELS[args.model]
            register_version(layout, args.model, "bench", embed_bench.artifact(args.model), dim=dim, input_size=input_size)
            proc = subprocess.run([sys.executable, __file__, "--child", root, "--model", args.model, "--batch", str(args.batch), "--chunk", str(args.chunk)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"[{time.strftime('%H:%M:%S')}] {size} done", file=sys.stderr)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"model={args.model} batch={args.batch} chunk={args.chunk} side={args.side} load={os.getloadavg()[0]:.2f}")
    print(f"{'images':>8} {'RSS after load MiB':>19} {'peak RSS MiB':>13} {'RSS at end MiB':>15} {'wall s':>8} {'img/s':>7}")
    for r in rows:
        print(f"{r['images']:>8} {r['rss_after_load_mib']:>19.0f} {r['peak_rss_mib']:>13.0f} {r['end_rss_mib']:>15.0f} {r['wall_s']:>8.1f} {r['images_per_s']:>7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
