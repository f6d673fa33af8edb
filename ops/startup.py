"""A local partition's start-up beyond its compute, measured here for the plan (docs/plan.md)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus
from dagster._cli.job import _create_run
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget
from dagster.version import __version__ as dagster_version

from backfill.errors import ConfigError
from backfill.plan import Startup
from ops.runs import measured_startup, run_phases

ROOT = Path(__file__).resolve().parents[1]
PROBE_MODULE = "ops.startup_probe"
PROBE_JOB = "startup_probe"  # the job of PROBE_MODULE
# The scratch instance the probe launches its runs on: this project's launcher, no queue (the runs start at once;
# the queue's hand-off is added from the real instance's dequeue interval), SQLite in a temporary folder.
SCRATCH_INSTANCE = """\
run_coordinator:
  module: dagster.core.run_coordinator
  class: DefaultRunCoordinator
run_launcher:
  module: ops.local_run_launcher
  class: LocalRunLauncher
telemetry:
  enabled: false
"""
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the runs' event lines stay off the console
PROBE_PHASES = ("launch", "to_step", "step", "finish")
DONE = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def local_startup(
    instance: DagsterInstance | None, slots: int, before_probe: Callable[[], None] | None = None
) -> Startup:
    """The local default's start-up per partition, from the best evidence at hand: the median over this
    instance's earlier embedding runs, else a probe that launches `slots` runs at once; plus the queue's hand-off.
    `before_probe` is called just before a probe starts (the CLI says what it is waiting for)."""
    startup = measured_startup(instance) if instance is not None else None
    if startup is None:
        if before_probe is not None:
            before_probe()
        startup = launched_startup(slots)
    return with_handoff(startup, instance)


def with_handoff(startup: Startup, instance: DagsterInstance | None) -> Startup:
    """Add the queue's hand-off: a slot freed waits for the run coordinator's next dequeue, half its interval on
    average. Neither earlier runs' figure nor the probe counts it (their runs did not wait in a queue)."""
    interval = getattr(instance.run_coordinator, "dequeue_interval_seconds", None) if instance is not None else None
    if not interval:
        return startup
    source = f"{startup.source}, + the queue's hand-off {interval / 2:.1f} s (half its {interval} s dequeue interval)"
    return Startup(startup.seconds + interval / 2, source, startup.add_model_load)


def launched_startup(slots: int, timeout_s: float = 300.0, module: str = PROBE_MODULE) -> Startup:
    """A partition's start-up timed now, through the real machinery, for an instance with no runs to measure.

    A scratch instance (this project's run launcher, SQLite in a temporary folder) and a code server of `module`
    (ops.startup_probe: the definitions plus a job whose step loads what an embedding step loads) are started;
    then `slots` runs are launched at once, as a backfill's first wave is. Each run's worker, step process
    (with the `local` deployment's multiprocess executor) and step and finish are timed from its events
    (ops.runs.run_phases); the median run's sum is the start-up. The model's load is added from the calibration.
    Every run is stopped and the code server shut down before this returns, on a failure or timeout too.
    """
    if slots < 1:
        raise ConfigError(f"run slots {slots}: the start-up probe needs at least 1")
    with tempfile.TemporaryDirectory(prefix="startup-probe-") as home:
        (Path(home) / "dagster.yaml").write_text(SCRATCH_INSTANCE)
        with DagsterInstance.from_config(home) as instance:  # its schema is created here, before any clock
            run_ids = _launch_and_wait(instance, slots, timeout_s, module)
            phases = [run_phases(instance, run_id) for run_id in run_ids]
    per_run = [sum(p.get(name, 0.0) for name in PROBE_PHASES) for p in phases]
    medians = ", ".join(f"{name} {statistics.median(p.get(name, 0.0) for p in phases):.1f}" for name in PROBE_PHASES)
    source = (f"a probe now: {slots} run(s) at once launched on a scratch instance, median run "
              f"{statistics.median(per_run):.1f} s ({medians})")  # fmt: skip
    return Startup(statistics.median(per_run), source, add_model_load=True)


def _launch_and_wait(instance: DagsterInstance, slots: int, timeout_s: float, module: str) -> list[str]:
    target = ModuleTarget(module_name=module, attribute="defs", working_directory=str(ROOT), location_name="probe")
    began = time.monotonic()
    with WorkspaceProcessContext(
        instance, target, version=dagster_version, read_only=False, code_server_log_level="WARNING"
    ) as process:
        workspace = process.create_request_context()
        errors = workspace.get_code_location_error("probe")
        if errors is not None:
            raise ConfigError(f"start-up probe: the code location {module} failed to load: {errors.message.strip()}")
        location = workspace.get_code_location("probe")
        (repo,) = location.get_repositories().values()
        remote_job = repo.get_full_job(PROBE_JOB)
        runs = [
            _create_run(instance=instance, code_location=location, remote_repo=repo, remote_job=remote_job,
                        run_config=QUIET, tags=None, op_selection=None, run_id=None)
            for _ in range(slots)
        ]  # fmt: skip
        run_ids = [run.run_id for run in runs]
        try:
            for run_id in run_ids:
                instance.submit_run(run_id, workspace)
            _wait(instance, run_ids, began + timeout_s, timeout_s)
        finally:
            for run_id in run_ids:  # a run still going (a timeout, an error above) is stopped, its processes with it
                run = instance.get_run_by_id(run_id)
                if run is not None and run.status not in DONE:
                    instance.run_launcher.terminate(run_id)
            _wait(instance, run_ids, time.monotonic() + 30.0, 30.0, quiet=True)
    return run_ids


def _wait(instance: DagsterInstance, run_ids: list[str], deadline: float, timeout_s: float, quiet: bool = False):
    """Until every run is done; a failed run or the deadline raises a ConfigError naming it (unless quiet)."""
    while True:
        runs = [instance.get_run_by_id(run_id) for run_id in run_ids]
        if all(run is not None and run.status in DONE for run in runs):
            break
        if time.monotonic() > deadline:
            if quiet:
                return
            going = sum(run is None or run.status not in DONE for run in runs)
            raise ConfigError(f"start-up probe: {going} of {len(run_ids)} run(s) still going after {timeout_s:.0f} s")
        time.sleep(0.2)
    failed = [run for run in runs if run.status != DagsterRunStatus.SUCCESS]
    if failed and not quiet:
        run = failed[0]
        raise ConfigError(f"start-up probe: run {run.run_id} {run.status.value}: {_failure(instance, run.run_id)}")


def _failure(instance: DagsterInstance, run_id: str) -> str:
    """The first error in a probe run's events, its innermost cause (the step's own exception)."""
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        error = getattr(event.event_specific_data, "error", None) if event is not None else None
        while error is not None and error.cause is not None:
            error = error.cause
        if error is not None:
            return f"{error.cls_name}: {error.message.strip().splitlines()[0]}"
    return "no error recorded"
