"""Orchestration overhead: a real Dagster backfill of K shards (daemon, queued runs, a process per step) against
the partitions' own compute time, and the start cost of one run. Prints a table; not a test. Takes a few minutes.

    .venv/bin/python bench/overhead_bench.py --shards 6 --images-per-shard 400
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backfill.embed import MARKER  # noqa: E402
from backfill.manifest import list_shards  # noqa: E402
from backfill.models import REFERENCE, torchscript_bytes  # noqa: E402
from backfill.registry import register_version  # noqa: E402
from backfill.sample import SampleSpec, make_sample_corpus  # noqa: E402
from backfill.storage import Layout, Store  # noqa: E402
from backfill.settings import DEFAULT_MODEL  # noqa: E402
from harness.local_instance import init_instance, start_daemon, stop, wait_for  # noqa: E402

MODEL = DEFAULT_MODEL


def start_cost(root: str, version: str) -> dict[str, float]:
    """A fresh interpreter: import the code location (what a run and a step process import), then load the model."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "import ops.definitions; ops.definitions.defs()\n"
        "t1 = time.perf_counter()\n"
        "from backfill.registry import read_card\n"
        "from backfill.runtime import load_model\n"
        "from backfill.storage import Layout, Store\n"
        f"layout = Layout(Store.open({root!r})); load_model(layout, read_card(layout, {MODEL!r}, {version!r}))\n"
        "print(t1 - t0, time.perf_counter() - t1)\n"
    )
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    total = time.perf_counter() - began
    imports, model = (float(v) for v in out.stdout.split())
    return {"process_s": total - imports - model, "imports_s": imports, "model_load_s": model, "total_s": total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--images-per-shard", type=int, default=400)
    p.add_argument("--version", default="v1", choices=sorted(REFERENCE))
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    work = Path(tempfile.mkdtemp(prefix="overhead-bench-"))
    root, home = work / "data", work / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "BACKFILL_ROOT": str(root), "BACKFILL_SENSOR_INTERVAL": "2", "BACKFILL_AUTOMATION_INTERVAL": "2"}
    os.environ.update(env)
    layout = Layout(Store.open(str(root)))
    make_sample_corpus(layout, SampleSpec(images=args.shards * args.images_per_shard, shards=args.shards, seed=11))
    shards = list_shards(layout)

    init_instance(home)
    log = home / "daemon.log"
    daemon = start_daemon(env, log)
    try:
        arch = REFERENCE[args.version]
        register_version(layout, MODEL, args.version, torchscript_bytes(arch), dim=arch.dim, input_size=arch.input_size)
        registered = time.time()
        done = lambda: all(layout.store.exists(f"{layout.embeddings(MODEL, args.version, s)}/{MARKER}") for s in shards)  # noqa: E731
        wait_for(done, args.timeout, interval=1.0, what=f"{len(shards)} shards embedded (see {log})")
        embedded = time.time()
    finally:
        stop(daemon)
    cost = start_cost(str(root), args.version)

    from dagster import AssetKey, DagsterInstance, RunsFilter

    with DagsterInstance.from_config(str(home)) as instance:
        walls = {}
        for record in instance.fetch_materializations(AssetKey("image_embeddings"), limit=1000).records:
            m = record.asset_materialization
            walls[m.partition] = m.metadata["wall_s"].value
        runs = []
        for rec in instance.get_run_records(RunsFilter()):
            part = rec.dagster_run.tags.get("dagster/partition", "")
            if part in walls and rec.start_time and rec.end_time:
                runs.append((part, rec.create_timestamp.timestamp(), rec.start_time, rec.end_time))
        slots = 2
    first_created = min(r[1] for r in runs)
    first_start, last_end = min(r[2] for r in runs), max(r[3] for r in runs)
    compute = sum(walls.values())
    makespan = last_end - first_start
    per_run = [end - start - walls[part] for part, _, start, end in runs]
    ideal = compute / slots
    rate = sum(args.images_per_shard for _ in walls) / compute
    c = statistics.median(per_run)
    print(f"shards={len(walls)} images/shard={args.images_per_shard} model={MODEL}/{args.version} run slots={slots} cores={os.cpu_count()} load={os.getloadavg()[0]:.2f}")
    rows = [
        ("registration -> first run created (sensor + automation polling)", first_created - registered),
        ("first run start -> last embedding run end (makespan)", makespan),
        ("sum of partitions' own compute (wall_s in embed_shard)", compute),
        (f"ideal makespan: compute / {slots} run slots", ideal),
        ("overhead: makespan / ideal - 1", makespan / ideal - 1),
        ("per run: run duration - its compute, median", c),
        ("per run: run duration - its compute, max", max(per_run)),
        ("fresh process: interpreter start", cost["process_s"]),
        ("fresh process: import the code location", cost["imports_s"]),
        ("fresh process: load + verify + probe the model", cost["model_load_s"]),
        ("registration -> all shards embedded", embedded - registered),
    ]
    for name, value in rows:
        shown = f"{value:8.1%}" if name.startswith("overhead") else f"{value:7.2f}s"
        print(f"{name:66} {shown}")
    print(f"partition compute rate: {rate:.0f} img/s per run on {slots} concurrent runs")
    print("projected overhead (per-run cost / partition compute) by shard size, at this rate and at 70 img/s (resnet18 bf16 here):")
    for size in (1_000, 10_000, 50_000, 100_000):
        print(f"  {size:>7} images/shard: {c / (size / rate):7.1%} at {rate:.0f} img/s, {c / (size / 70):7.1%} at 70 img/s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
