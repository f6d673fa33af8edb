"""Scale bench: prints tables of measured costs at corpus sizes; one subcommand per section.

    python bench/scale_bench.py discover --shards 1000 3000 10000 --rows 1000 [--before /work/main]
    python bench/scale_bench.py queue --shards 1000 10000 30000 --storage sqlite postgres --window 90
    python bench/scale_bench.py index --n 1000000 --shards 10 --threads 1 --old main   (bench/index_bench.py)
    python bench/scale_bench.py extrapolate --queue-json queue.json   (to 1B images; extrapolated, not measured)

`queue` is bench/queue_bench.py: the real dagster-daemon and dagster-webserver over N shard partitions, queued
runs never started; runs queued per second, automation tick seconds, the UI's partition-status query.

`discover` writes N synthetic manifest shards (range-partitioned int64 ids, one URI per row), then times
registry ticks (backfill.discovery.discover, as the sensor calls it) in a fresh process per case:
first deploy (every shard new, ticks repeated until nothing is pending) and steady state (N known + 1 new).
Peak RSS is the process's (torch is imported, as in the code server); `base` is the RSS before the first tick.
`--before REPO` runs the same cases with another checkout's engine (e.g. main) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUE_HEADER = (
    "storage", "shards", "targeted", "started", "add s", "backfill s", "1st run s", "runs", "window s", "runs/s 0-30s",
    "runs/s window", "runs/s last 30s", "daemon MiB", "auto tick 1st/med/max s", "index tick med/max s",
    "UI status s", "backfills page s", "load",
)  # fmt: skip


def write_corpus(root: str, shards: int, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = os.path.join(root, "corpus", "manifests")
    os.makedirs(folder, exist_ok=True)
    uris = pa.array(["images/x.jpg"] * rows, pa.string())
    for i in range(shards):
        ids = pa.array(range(i * rows, (i + 1) * rows), pa.int64())
        pq.write_table(pa.table({"image_id": ids, "uri": uris}), os.path.join(folder, f"shard-{i:06d}.parquet"))


def measure(repo: str, root: str, case: str, timeout_s: float) -> dict:
    """One case in a fresh process, with `repo`'s engine on sys.path."""
    cmd = [sys.executable, os.path.abspath(__file__), "_tick", "--repo", repo, "--root", root, "--case", case]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=repo, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"> {timeout_s:.0f} s"}
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:60]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tick_worker(repo: str, root: str, case: str) -> None:
    sys.path.insert(0, repo)
    import inspect

    from backfill.discovery import discover
    from backfill.manifest import list_shards
    from backfill.storage import Layout, Store

    layout = Layout(Store.open(root))
    names = list_shards(layout)
    known = set() if case == "first" else {n for n in names if n != "zz-new"}
    base = _rss_mib()
    ticks, worst, total = 0, 0.0, 0.0
    budgeted = "budget" in inspect.signature(discover).parameters
    while True:
        started = time.perf_counter()
        found = discover(layout, "refcnn", known_versions=set(), known_shards=known)
        took = time.perf_counter() - started
        ticks, worst, total = ticks + 1, max(worst, took), total + took
        known |= set(found.new_shards)
        if not budgeted or not found.pending or not found.new_shards:
            break
    row = {
        "ticks": ticks,
        "worst_tick_s": worst,
        "total_s": total,
        "added": len(found.new_shards) if ticks == 1 else None,
    }
    print(json.dumps({**row, "known": len(known), "peak_mib": _rss_mib(), "base_mib": base}))


CASES = {"first": "first deploy", "one-new": "N known + 1"}
HEADER = ("engine", "shards", "case", "ticks", "worst tick s", "total s", "peak MiB", "base MiB")


def _line(*cells: object) -> str:
    widths, left = (7, 7, 14, 5, 12, 8, 9, 9), (0, 2)
    return " ".join(f"{c:<{w}}" if i in left else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))


def _result(r: dict) -> tuple:
    if "error" in r:
        return (r["error"],)
    return r["ticks"], f"{r['worst_tick_s']:.2f}", f"{r['total_s']:.2f}", f"{r['peak_mib']:.0f}", f"{r['base_mib']:.0f}"


def discover_section(args: argparse.Namespace) -> None:
    engines = [("after", HERE)] + ([("before", os.path.abspath(args.before))] if args.before else [])
    print(f"discover: {args.rows}-row shards, range-partitioned ids, local disk, {os.cpu_count()} CPUs")
    print(_line(*HEADER))
    print("-" * len(_line(*HEADER)))
    for n in args.shards:
        with tempfile.TemporaryDirectory(prefix="scale-bench-") as root:
            write_corpus(root, n, args.rows)
            for case, name in CASES.items():
                if case == "one-new":
                    _add_one_new(root, args.rows, n)
                for label, repo in engines:
                    if label == "before" and case == "first" and n > args.before_max_first:
                        print(_line(label, n, name, "skipped: quadratic (see --before-max-first)"))
                    else:
                        print(_line(label, n, name, *_result(measure(repo, root, case, args.timeout))), flush=True)


def _add_one_new(root: str, rows: int, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = pa.array(range(n * rows, (n + 1) * rows), pa.int64())
    table = pa.table({"image_id": ids, "uri": pa.array(["images/x.jpg"] * rows, pa.string())})
    pq.write_table(table, os.path.join(root, "corpus", "manifests", "zz-new.parquet"))


def _med_max(stats: dict, first: bool = False) -> str:
    if not stats:
        return "-"
    return (f"{stats['first']:.2f}/" if first else "") + f"{stats['median']:.2f}/{stats['max']:.2f}"


def queue_row(r: dict) -> str:
    if r.get("error"):
        return f"{r['storage']:<8} {r['shards']:>7}  error: {r['error']}"
    cells = (
        r["storage"], r["shards"], r["targeted"], r["started"], f"{r['add_partitions_s']:.1f}",
        f"{r['backfill_after_s']:.1f}", f"{r['first_run_after_s']:.1f}", r["runs"], f"{r['window_s']:.0f}",
        f"{r['start_rate']:.2f}", f"{r['window_rate']:.2f}", f"{r['end_rate']:.2f}", r["daemon_peak_mib"],
        _med_max(r["ticks"].get("backfill_automation", {}), first=True),
        _med_max(r["ticks"].get("index_automation", {})), _med_max(r["queries"].get("partition_status", {})),
        _med_max(r["queries"].get("backfills_page", {})), r.get("load", "-"),
    )  # fmt: skip
    return " | ".join(str(c) for c in cells)


def queue_section(args: argparse.Namespace) -> None:
    sys.path.insert(0, HERE)
    from bench.queue_bench import run_case

    print(
        f"queue: one backfill of image_embeddings over N shards x 1 version, real dagster-daemon, "
        f"max_concurrent_runs 0, window {args.window:.0f} s after the first run, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(" | ".join(QUEUE_HEADER))
    results = []
    for n in args.shards:  # storages side by side at each size: the load of this shared box drifts
        for storage in args.storage:
            r = run_case(storage, n, window_s=args.window, max_runs=args.max_runs, interval_s=args.interval)
            results.append(r)
            print(queue_row(r), flush=True)
            if args.json:
                with open(args.json, "w") as f:  # rewritten after each case: a cut-short run keeps what it measured
                    json.dump(results, f, indent=1)


def extrapolate_section(args: argparse.Namespace) -> None:
    sys.path.insert(0, HERE)
    from bench.extrapolate import Scenario, from_queue_json, table

    given = {k: v for k, v in vars(args).items() if k in Scenario.__dataclass_fields__ and v is not None}
    if args.queue_json:
        given["runs_per_s"], given["backfill_created_s"] = from_queue_json(args.queue_json)
    print(table(Scenario(**given)))


def main() -> None:
    if sys.argv[1:2] == ["index"]:  # bench/index_bench.py, with its own flags
        sys.path.insert(0, HERE)
        from bench import index_bench

        sys.exit(index_bench.main(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="section", required=True)
    d = sub.add_parser("discover", help="registry ticks at first deploy and with one new shard")
    d.add_argument("--shards", type=int, nargs="+", default=[1000, 3000])
    d.add_argument("--rows", type=int, default=1000)
    d.add_argument("--before", default="", help="another checkout whose engine to compare with (e.g. /work/main)")
    d.add_argument("--before-max-first", type=int, default=1000, help="largest first deploy to run with --before")
    d.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    q = sub.add_parser("queue", help="runs queued per second by the real backfill daemon; ticks; UI queries")
    q.add_argument("--shards", type=int, nargs="+", default=[1000, 10000, 30000])
    q.add_argument("--storage", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"])
    q.add_argument("--window", type=float, default=90.0, help="seconds to sample the run count after the first run")
    q.add_argument("--max-runs", type=int, default=0, help="stop sampling at this many runs (0: all partitions)")
    q.add_argument("--interval", type=int, default=30, help="automation sensor interval (s; 30 is the product default)")
    q.add_argument("--json", default="", help="write the results here too (input of `extrapolate`)")
    sub.add_parser("index", help="the index build step by step (bench/index_bench.py; its flags follow)")
    e = sub.add_parser("extrapolate", help="hours, memory and disk per step at 1B images (EXTRAPOLATED)")
    e.add_argument("--queue-json", default="", help="`queue --json` output: its slowest rate at the largest size")
    for name, kind in (
        ("images", int), ("shards", int), ("versions", int), ("dim", int), ("runs_per_s", float),
        ("backfill_created_s", float), ("gpu_pods", int), ("gpu_img_s", float), ("pod_start_s", float),
        ("discover_s_per_mrow", float), ("index_pods", int), ("index_threads", int), ("index_memory_mb", int),
        ("upload_mb_s", float),
    ):  # fmt: skip
        e.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None)
    w = sub.add_parser("_tick")  # internal: one case in a fresh process
    w.add_argument("--repo", required=True)
    w.add_argument("--root", required=True)
    w.add_argument("--case", required=True)
    args = parser.parse_args()
    if args.section == "_tick":
        _tick_worker(args.repo, args.root, args.case)
    elif args.section == "queue":
        queue_section(args)
    elif args.section == "extrapolate":
        extrapolate_section(args)
    else:
        discover_section(args)


if __name__ == "__main__":
    main()
