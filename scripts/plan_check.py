"""Plan against actual on this machine: the demo's corpus and versions, `backfill plan` before each backfill,
the real daemon's backfill, then the backfill_report asset. Prints plan vs actual; leaves the root and the
DAGSTER_HOME in --work for `dagster dev` (or a screenshot of the report).

    .venv/bin/python scripts/plan_check.py --work /tmp/plan-check
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backfill.embed import MARKER  # noqa: E402
from backfill.manifest import list_shards  # noqa: E402
from backfill.publish import read_pointer  # noqa: E402
from backfill.sample import SampleSpec, make_sample_corpus  # noqa: E402
from backfill.settings import DEFAULT_MODEL  # noqa: E402
from backfill.storage import Layout, Store  # noqa: E402
from harness.local_instance import init_instance, start_daemon, stop, wait_for  # noqa: E402
from scripts.demo import register_demo_version  # noqa: E402

MODEL = DEFAULT_MODEL


def plan(version: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "backfill.cli", "plan", version]
    print("$ backfill plan", version, flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def alone_wall(layout: Layout, version: str) -> float:
    """The same plan calibrated the way stop 21 did, for a ratio from the same run: the sample in one slot
    alone (split across the run slots by CPUs), no warm-up term; the start-up as the saved plan's."""
    from dataclasses import replace

    from backfill.calibrate import calibrate, plan_for
    from backfill.plan import PodSpec
    from backfill.settings import Settings

    saved, settings = _plan(layout, version), Settings.from_env()
    c = calibrate(layout, MODEL, version, settings.embed, slots=1)
    # the warm-up the plan added: plan_for scales the calibration's to the pod's rate
    added = saved.get("warmup_s", 0.0) * saved["calibrated_img_s"] / saved["img_s_per_pod"]
    startup = saved["startup_s"] - added
    pod = PodSpec("local", c.device, cpus=c.cpus, shares_host=True, startup_s=startup)
    return plan_for(layout, replace(c, warmup_s=0.0), pod, saved["pods"], settings.index).wall_s


def backfill(layout: Layout, version: str, env: dict[str, str], log: Path, timeout: float) -> float:
    """Start the daemon, wait until `version` is published, stop it; seconds from start to published."""
    began = time.monotonic()
    daemon = start_daemon(env, log)
    try:
        shards = list_shards(layout)
        done = lambda: all(layout.store.exists(f"{layout.embeddings(MODEL, version, s)}/{MARKER}") for s in shards)  # noqa: E731
        wait_for(done, timeout, what=f"{version}: every shard embedded (see {log})")
        published = lambda: (read_pointer(layout, MODEL) or {}).get("version") == version  # noqa: E731
        wait_for(published, timeout, what=f"{version} published (see {log})")
    finally:
        stop(daemon)
    return time.monotonic() - began


def report(version: str) -> dict:
    from dagster import AssetKey, DagsterInstance, materialize

    from assets.report import backfill_report
    from assets.resources import BackfillResource
    from backfill.settings import Settings

    instance = DagsterInstance.get()
    resources = {"backfill": BackfillResource.from_settings(Settings.from_env())}
    assert materialize([backfill_report], partition_key=version, instance=instance, resources=resources).success
    event = instance.fetch_materializations(AssetKey("backfill_report"), limit=50).records
    m = next(r.asset_materialization for r in event if r.asset_materialization.partition == version)
    return {k: v.value for k, v in m.metadata.items()}


def phases(version: str) -> str:
    """The median of each phase over the version's successful embedding runs (ops.runs.run_phases)."""
    import statistics

    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from ops.runs import PHASES, VERSION_TAG, run_phases

    instance = DagsterInstance.get()
    records = instance.get_run_records(RunsFilter(tags={VERSION_TAG: version}, statuses=[DagsterRunStatus.SUCCESS]))
    per_run = [run_phases(instance, r.dagster_run.run_id) for r in records]
    cells = []
    for name in (*PHASES, "body"):
        values = [p[name] for p in per_run if name in p]
        if values:
            cells.append(f"{name} {statistics.median(values):.1f}")
    return f"{version}: median seconds over {len(per_run)} runs: " + ", ".join(cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/plan-check")
    p.add_argument("--versions", nargs="+", default=["v1", "v2"])
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--alone", action="store_true", help="also plan from a calibration in one slot alone (ratio)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    root, home = work / "data", work / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "BACKFILL_ROOT": str(root),
        "BACKFILL_SENSOR_INTERVAL": "5",  # as scripts/demo.py
        "BACKFILL_AUTOMATION_INTERVAL": "5",
        "PYTHONWARNINGS": "ignore",
    }
    os.environ.update(env)
    layout = Layout(Store.open(str(root)))
    made = make_sample_corpus(layout, SampleSpec(images=800, shards=4))  # the demo's corpus
    print(f"corpus: {made['images']} images in {made['shards']} shards; load {os.getloadavg()[0]:.2f}", flush=True)
    init_instance(home)
    rows = []
    for version in args.versions:
        register_demo_version(layout, version)  # the daemon is stopped: the plan runs alone
        plan(version, env)
        alone = alone_wall(layout, version) if args.alone else None
        if alone is not None:
            print(f"{version}: plan wall with the sample calibrated alone: {alone:.1f} s", flush=True)
        took = backfill(layout, version, env, home / "daemon.log", args.timeout)
        print(f"{version}: registered -> published in {took:.0f} s; load {os.getloadavg()[0]:.2f}", flush=True)
        m = report(version)  # materialized after each version: a partial run still reports what it did
        print(phases(version), flush=True)
        vs_alone = f"{m['wall_s'] / alone:14.3f}" if alone else f"{'-':>14}"
        rows.append(f"{version:8} {m['plan_wall_s']:11.1f} {m['wall_s']:13.1f} {m['wall_vs_plan']:11.3f} "
                    f"{_plan(layout, version)['pod_hours']:10.4f} {m['pod_hours']:12.4f} {vs_alone}")  # fmt: skip
        print(rows[-1], flush=True)
    print(f"\n{'version':8} {'plan wall s':>11} {'actual wall s':>13} {'actual/plan':>11} {'pod-h plan':>10} "
          f"{'pod-h actual':>12} {'actual/alone':>14}")  # fmt: skip
    print("\n".join(rows))
    print(f"\nDAGSTER_HOME={home} BACKFILL_ROOT={root} .venv/bin/dagster dev   # the report: Assets -> backfill_report")
    return 0


def _plan(layout: Layout, version: str) -> dict:
    from backfill.report import read_plan

    return read_plan(layout, MODEL, version) or {}


if __name__ == "__main__":
    sys.exit(main())
