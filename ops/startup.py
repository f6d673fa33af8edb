"""A local partition's start-up beyond its compute, measured here for the plan (docs/plan.md)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dagster import DagsterInstance

from backfill.errors import ConfigError
from backfill.plan import Startup
from backfill.settings import Settings
from ops.runs import measured_startup, run_phases

# What a partition's processes load before its step's body: the run worker loads the code location (the module
# and its repository), and the step process (the multiprocess executor's, spawned) loads it again and then the
# engine with torch.
RUN_WORKER_IMPORTS = "from ops.definitions import defs; defs().get_repository_def()"
STEP_IMPORTS = f"{RUN_WORKER_IMPORTS}; import torch, backfill.embed"


def local_startup(instance: DagsterInstance | None, slots: int, run_id: str | None = None) -> Startup:
    """The local default's start-up per partition, from the best evidence at hand: the median over this
    instance's earlier embedding runs; else `run_id`'s own (a launched run: the plan asset's); else a probe."""
    if instance is not None:
        measured = measured_startup(instance)
        if measured is not None:
            return measured
        if run_id is not None:
            own = own_run_startup(instance, run_id)
            if own is not None:
                return own
    return probe_startup(slots)


def own_run_startup(instance: DagsterInstance, run_id: str) -> Startup | None:
    """A launched run's own start-up: its worker's launch and its step process's start (run_phases).

    It started alone, so it misses what `slots` runs starting at once cost each other; the model's load is added
    from the calibration. None for a run executed in process (no worker was launched).
    """
    phases = run_phases(instance, run_id)
    if "launch" not in phases or "to_step" not in phases:
        return None
    source = "this plan's own run: its worker's and its step's start, alone"
    return Startup(phases["launch"] + phases["to_step"], source, add_model_load=True)


def probe_startup(slots: int, timeout_s: float = 300.0) -> Startup:
    """A partition's start-up timed on this machine now, for an instance with no runs to measure yet.

    `slots` fresh interpreters at once load the code location, as the first wave's run workers do, then (with
    the multiprocess executor, the `local` deployment) as many again load it with the engine, as their step
    processes do; the waits add up. The Dagster events between them are not timed (bench/overhead_bench.py:
    within a second of the process starts); the model's load is added from the calibration.
    """
    if slots < 1:
        raise ConfigError(f"run slots {slots}: the start-up probe needs at least 1")
    waves = [("run workers'", RUN_WORKER_IMPORTS)]
    if Settings.from_env().deployment == "local":  # local-in-process runs its steps in the run worker
        waves.append(("their steps'", STEP_IMPORTS))
    took = [_wave(code, slots, timeout_s) for _, code in waves]
    parts = " + ".join(f"{what} {t:.1f} s" for (what, _), t in zip(waves, took, strict=True))
    return Startup(sum(took), f"probe now, {slots} at once: {parts}", add_model_load=True)


def _wave(code: str, slots: int, timeout_s: float) -> float:
    """Seconds until `slots` interpreters started at once have each run `code`; every one is gone after."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", code]  # the environment is inherited: they see this process's settings
    with tempfile.TemporaryDirectory(prefix="startup-probe-") as folder:
        logs = [open(Path(folder) / f"{i}.err", "w+") for i in range(slots)]  # noqa: SIM115  # closed below
        began, procs = time.monotonic(), []
        try:
            procs = [subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=log) for log in logs]
            for proc, log in zip(procs, logs, strict=False):
                left = timeout_s - (time.monotonic() - began)
                try:
                    proc.wait(timeout=max(left, 0.0))
                except subprocess.TimeoutExpired:
                    raise ConfigError(
                        f"start-up probe: `python -c {code!r}` still running after {timeout_s:.0f} s"
                    ) from None
                if proc.returncode != 0:
                    log.seek(0)
                    tail = log.read().strip().splitlines()[-1:] or ["no output"]
                    raise ConfigError(f"start-up probe: `python -c {code!r}` failed ({proc.returncode}): {tail[0]}")
            return time.monotonic() - began
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for log in logs:
                log.close()
