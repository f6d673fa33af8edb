"""A stand-in for ops.startup_probe in the probe's failure tests: its step fails or hangs (PROBE_FIXTURE_MODE),
and writes its process id to PROBE_FIXTURE_PID so that a test can check the process is gone."""

import os
import time

from dagster import Definitions, job, op

from ops.startup import PROBE_JOB


@op
def step() -> None:
    with open(os.environ["PROBE_FIXTURE_PID"], "a") as out:
        out.write(f"{os.getpid()}\n")
    if os.environ["PROBE_FIXTURE_MODE"] == "fail":
        raise RuntimeError("no torch here")
    time.sleep(600)


@job(name=PROBE_JOB)
def probe() -> None:
    step()


defs = Definitions(jobs=[probe])
