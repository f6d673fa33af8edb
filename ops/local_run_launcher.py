"""The local instance's run launcher: Dagster's default one, plus a run worker health check for run monitoring."""

from __future__ import annotations

import os

from dagster import DagsterEventType, DagsterRun
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus

# Dagster's DefaultRunLauncher has no health check, so run monitoring never fails a STARTED run
# whose worker died with its code server (a daemon whose whole process group was killed): the
# run stays STARTED and its backfill waits for ever. Here every run worker is a process on this
# host that reported its pid ("Started process for run (pid: N)"), so the check is a /proc look-up.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PID_REUSE_SLACK_S = 900.0  # a worker starts at most this long before its report (its imports, on a loaded host)


class LocalRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher whose run workers run monitoring can check (same host: the local deployment only)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        reported = _reported_pid(self._instance, run.run_id)
        if reported is None:
            # nothing to check yet: the worker reports its pid before the run starts
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker pid reported yet")
        pid, reported_at = reported
        started = _process_start(pid)
        # the same process, not a reused pid (pid_max may be 32768): a Python that started before its report
        # (btime is whole seconds, hence the 5 s)
        same = started is not None and reported_at - _PID_REUSE_SLACK_S <= started <= reported_at + 5
        if same and b"python" in _cmdline(pid):
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker pid {pid} is alive")
        return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker pid {pid} is gone (its node or parent died)")


def _reported_pid(instance, run_id: str) -> tuple[int, float] | None:
    """The newest (pid, report time) of the run's "Started process for run" engine events."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT, ascending=False).records
    for record in records:
        event = record.event_log_entry.dagster_event
        metadata = event.engine_event_data.metadata if event and event.engine_event_data else {}
        if "pid" in metadata and "Started process for run" in (record.event_log_entry.message or ""):
            return int(metadata["pid"].value), record.event_log_entry.timestamp
    return None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _process_start(pid: int) -> float | None:
    """A live process's start, in seconds since the epoch (None when there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, StopIteration, IndexError):
        return None
    if fields[0] == "Z":  # a zombie: it ended and its parent has not reaped it
        return None
    return boot + int(fields[19]) / _CLOCK_TICKS
