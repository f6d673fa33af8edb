"""The local run launcher's health check: run monitoring can tell a live run worker from one that died."""

import os
import subprocess
import sys

import pytest
from dagster import instance_for_test
from dagster._core.events import EngineEventData
from dagster._core.launcher.base import WorkerStatus
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.test_utils import create_run_for_test

from ops.local_run_launcher import LocalRunLauncher

LAUNCHER = {"run_launcher": {"module": "ops.local_run_launcher", "class": "LocalRunLauncher"}}


def _started_run(instance, pid: int | None):
    run = create_run_for_test(instance, job_name="j", status=DagsterRunStatus.STARTED)
    if pid is not None:
        instance.report_engine_event(f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid))
    return run


@pytest.fixture(scope="module")
def instance():
    with instance_for_test(overrides=LAUNCHER) as instance:
        yield instance


def test_a_live_worker_is_running_and_a_dead_one_failed(instance):
    launcher = instance.run_launcher
    assert isinstance(launcher, LocalRunLauncher) and launcher.supports_check_run_worker_health
    alive = _started_run(instance, os.getpid())
    assert launcher.check_run_worker_health(alive).status == WorkerStatus.RUNNING

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = _started_run(instance, int(gone.stdout))
    result = launcher.check_run_worker_health(dead)
    assert result.status == WorkerStatus.FAILED and f"pid {int(gone.stdout)} is gone" in result.msg


def test_a_pid_reported_long_after_the_process_started_is_someone_else(instance):
    # pid 1 started long before this report: a reused pid, so the worker is gone
    run = _started_run(instance, 1)
    assert instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.FAILED


def test_before_the_worker_reports_its_pid_nothing_is_failed(instance):
    run = _started_run(instance, None)
    assert instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
