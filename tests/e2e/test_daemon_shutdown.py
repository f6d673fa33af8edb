"""SIGTERM ends the real dagster-daemon within the harness's grace period while a sensor evaluation is running."""

import signal
from pathlib import Path

import pytest

from harness.local_instance import BIN, new_instance, start, stop, wait_for

pytestmark = pytest.mark.e2e

GRACE_S = 20  # below the daemon's own 30 s wait for a stuck daemon thread, which used to decide its exit


def test_sigterm_during_a_sensor_evaluation_ends_the_daemon(tmp_path: Path):
    workspace = tmp_path / "workspace.yaml"
    defs = Path(__file__).with_name("slow_sensor_defs.py")
    workspace.write_text(f"load_from:\n  - python_file:\n      relative_path: {defs}\n")
    marker = tmp_path / "evaluating"
    env = new_instance(tmp_path / "dagster_home", tmp_path / "root", SLOW_SENSOR_MARKER=str(marker))
    daemon = start([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env, tmp_path / "daemon.log")
    try:
        wait_for(marker.exists, timeout=180, interval=0.5, what=f"the sensor's evaluation (log: {tmp_path})")
        assert daemon.poll() is None
        # the evaluation sleeps far longer than GRACE_S: only a stop that does not wait for it passes
        ended_by_sigterm = stop(daemon, timeout=GRACE_S)
    finally:
        stop(daemon, timeout=1)
    log = (tmp_path / "daemon.log").read_text()
    assert ended_by_sigterm, f"needed SIGKILL after {GRACE_S}s:\n{log[-3000:]}"
    assert daemon.returncode != -signal.SIGKILL
