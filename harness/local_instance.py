"""Start and stop the real dagster-daemon and dagster-webserver for the local default (demo and e2e tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_dagster_home(home: Path) -> None:
    """Empty a DAGSTER_HOME except its dagster.yaml (the instance settings the project ships)."""
    home.mkdir(parents=True, exist_ok=True)
    for entry in home.iterdir():
        if entry.name == "dagster.yaml":
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def init_instance(home: Path) -> None:
    """Create the instance's SQLite storage once, before any Dagster process starts.

    Two processes that open a fresh instance at the same time race to create and stamp
    its schema; the loser's code server then fails with "alembic_version has more than
    one head" on every load.
    """
    from dagster import AssetKey, DagsterInstance, RunsFilter

    with DagsterInstance.from_config(str(home)) as instance:
        instance.get_run_records(RunsFilter(), limit=1)  # run storage
        instance.all_instigator_state()  # schedule storage
        instance.get_latest_materialization_event(AssetKey("_init"))  # event log index


def new_instance(home: Path, root: Path | str, interval_s: int = 2, **settings: str) -> dict[str, str]:
    """Create DAGSTER_HOME (the project's dagster.yaml, storage initialised); return the environment of its processes.

    The processes work over `root`, their sensors tick every `interval_s` seconds, and
    `settings` (BACKFILL_* names) are added last, so they may override any of these.
    """
    home.mkdir(parents=True)  # a fresh one: an instance left by an earlier run would carry its runs over
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    init_instance(home)
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
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


def start_daemon(env: dict[str, str], log: Path) -> subprocess.Popen:
    return start([str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")], env, log)


def start_webserver(env: dict[str, str], log: Path, port: int) -> subprocess.Popen:
    return start([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")], env, log)


def start_search_service(env: dict[str, str], log: Path, port: int, poll_s: float = 0.5) -> subprocess.Popen:
    """`backfill serve` on loopback (root and model from BACKFILL_ROOT / BACKFILL_MODEL in env)."""
    return start([str(BIN / "python"), "-m", "backfill.cli", "serve", "--port", str(port), "--poll-s", str(poll_s)], env, log)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `timeout` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _children() -> dict[int, list[int]]:
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


def step_worker_pids(root_pid: int) -> list[int]:
    """Pids of step processes below root_pid (Linux /proc), e.g. below a dagster-daemon.

    The code server (`dagster api grpc`) starts each run worker; the run worker's
    multiprocess executor starts each step as a child process. A step process is thus a
    multiprocessing child of a child of a code server (its resource tracker aside).
    """
    tree = _children()
    servers, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        if "dagster api grpc" in _cmdline(pid):
            servers.append(pid)
        stack.extend(tree.get(pid, []))
    steps = []
    for server in servers:
        for run_worker in tree.get(server, []):
            for child in tree.get(run_worker, []):
                cmd = _cmdline(child)
                if "multiprocessing" in cmd and "resource_tracker" not in cmd:
                    steps.append(child)
    return sorted(steps)
