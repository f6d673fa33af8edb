"""Start and stop the real dagster-daemon and dagster-webserver for the local default (demo and e2e tests)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness.local_postgres import Server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHIPPED_HOME_FILES = ("dagster.yaml", "dagster-postgres.yaml")  # the instance settings the project ships


def reset_dagster_home(home: Path) -> None:
    """Empty a DAGSTER_HOME except the instance settings the project ships (SHIPPED_HOME_FILES)."""
    home.mkdir(parents=True, exist_ok=True)
    for entry in home.iterdir():
        if entry.name in SHIPPED_HOME_FILES:
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def init_instance(home: Path) -> None:
    """Create the instance's storage (SQLite or PostgreSQL) once, before any Dagster process starts.

    Two processes that open a fresh instance at the same time race to create and stamp
    its schema; the loser's code server then fails with "alembic_version has more than
    one head" on every load.
    """
    from dagster import AssetKey, DagsterInstance, RunsFilter

    with DagsterInstance.from_config(str(home)) as instance:
        instance.get_run_records(RunsFilter(), limit=1)  # run storage
        instance.all_instigator_state()  # schedule storage
        instance.get_latest_materialization_event(AssetKey("_init"))  # event log index


def new_instance(
    home: Path, root: Path | str, interval_s: int = 2, postgres: Server | None = None, **settings: str
) -> dict[str, str]:
    """Create DAGSTER_HOME (the project's dagster.yaml, storage initialised); return the environment of its processes.

    The processes work over `root`, their sensors tick every `interval_s` seconds, and
    `settings` (BACKFILL_* names) are added last, so they may override any of these.
    With `postgres` (an empty database), the instance stores runs, events and schedules
    there: dagster.yaml gets dagster_home/dagster-postgres.yaml's storage block appended.
    """
    home.mkdir(parents=True)  # a fresh one: an instance left by an earlier run would carry its runs over
    shipped = REPO / "dagster_home"
    config = (shipped / "dagster.yaml").read_text()
    storage_env = postgres.env() if postgres else {}
    if postgres:
        config += "\n" + (shipped / "dagster-postgres.yaml").read_text()
    (home / "dagster.yaml").write_text(config)
    os.environ.update(storage_env)  # this process opens the instance too (init_instance, the chaos verdicts)
    init_instance(home)
    return {
        **os.environ,
        **storage_env,
        "DAGSTER_HOME": str(home),
        # this checkout's packages first in every Dagster process (the daemon imports the run launcher, ops/)
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "BACKFILL_ROOT": str(root),
        "BACKFILL_SENSOR_INTERVAL": str(interval_s),
        "BACKFILL_AUTOMATION_INTERVAL": str(interval_s),
        **settings,
    }


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a Dagster process in its own process group with default INT/TERM handling.

    Dagster copies an ignored SIGINT disposition onto SIGTERM; a process started from a
    non-interactive script inherits SIGINT ignored, so `env --default-signal` restores both.
    """
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            ["env", "--default-signal=INT,TERM", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# What the daemon's environment needs beyond the instance (the Helm chart sets the same in dagsterDaemon.env):
# an asset backfill the daemon evaluates while its code location fails to load (a code server starting up, or
# killed while it does) is, by Dagster's default, failed for good with DagsterAssetBackfillDataLoadError, and
# its partitions are never requested (dagster issues 18640, 28204); with this set, the daemon skips it until
# the location loads again.
DAEMON_ENV = {"DAGSTER_BACKFILL_RETRY_DEFINITION_CHANGED_ERROR": "1"}


def start_daemon(env: dict[str, str], log: Path) -> subprocess.Popen:
    return start([str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")], {**env, **DAEMON_ENV}, log)


def start_webserver(env: dict[str, str], log: Path, port: int) -> subprocess.Popen:
    return start(
        [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")],
        env,
        log,
    )


def start_search_service(env: dict[str, str], log: Path, port: int, poll_s: float = 0.5) -> subprocess.Popen:
    """`backfill serve` on loopback (root and model from BACKFILL_ROOT / BACKFILL_MODEL in env)."""
    return start(
        [str(BIN / "python"), "-m", "backfill.cli", "serve", "--port", str(port), "--poll-s", str(poll_s)], env, log
    )


def stop(proc: subprocess.Popen, timeout: float = 30) -> bool:
    """SIGTERM the process group, then SIGKILL what is left after `timeout` seconds; True if SIGTERM sufficed.

    Code servers (`dagster api grpc`) below the process get SIGKILL at once: a daemon (or
    webserver) thread waiting on a code server call, a sensor evaluation say, sees the
    shutdown request only when the call returns, and the daemon waits 30 s per such thread
    before it exits (DagsterDaemonController.__exit__), while the code server itself,
    on SIGTERM, first lets its calls finish. A code server holds nothing to lose: an
    abandoned sensor tick is evaluated again by the next daemon (its cursor did not move).
    """
    if proc.poll() is not None:
        return True
    servers = {pid: start_time(pid) for pid in code_server_pids(proc.pid)}
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    for pid, born in servers.items():
        if born is not None and start_time(pid) == born:  # still that process, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False


def start_time(pid: int) -> str | None:
    """A process's start time in clock ticks (with the pid, it names one process: pids are reused)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def children() -> dict[int, list[int]]:
    """Every process's children, by parent pid (Linux /proc)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def code_server_pids(root_pid: int) -> list[int]:
    """Pids of code servers (`dagster api grpc`) below root_pid (Linux /proc), e.g. below a dagster-daemon."""
    return sorted(_code_servers(children(), root_pid))


def run_worker_pids(root_pid: int) -> list[int]:
    """Pids of run workers below root_pid: the code server starts each run as a child process."""
    tree = children()
    return sorted(
        pid
        for server in _code_servers(tree, root_pid)
        for pid in tree.get(server, [])
        if "resource_tracker" not in _cmdline(pid)
    )


def _code_servers(tree: dict[int, list[int]], root_pid: int) -> list[int]:
    servers, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        if "dagster api grpc" in _cmdline(pid):
            servers.append(pid)
        stack.extend(tree.get(pid, []))
    return servers


def step_worker_pids(root_pid: int) -> list[int]:
    """Pids of step processes below root_pid (Linux /proc), e.g. below a dagster-daemon.

    The code server (`dagster api grpc`) starts each run worker; the run worker's
    multiprocess executor starts each step as a child process. A step process is thus a
    multiprocessing child of a child of a code server (its resource tracker aside).
    """
    tree = children()
    steps = []
    for server in _code_servers(tree, root_pid):
        for run_worker in tree.get(server, []):
            for child in tree.get(run_worker, []):
                cmd = _cmdline(child)
                if "multiprocessing" in cmd and "resource_tracker" not in cmd:
                    steps.append(child)
    return sorted(steps)
