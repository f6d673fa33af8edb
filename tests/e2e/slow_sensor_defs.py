"""A code location whose one sensor sleeps in its evaluation (tests/e2e/test_daemon_shutdown.py)."""

import os
import time
from pathlib import Path

from dagster import DefaultSensorStatus, Definitions, SkipReason, sensor

SLEEP_S = float(os.environ.get("SLOW_SENSOR_SLEEP_S", "120"))


@sensor(minimum_interval_seconds=1, default_status=DefaultSensorStatus.RUNNING, target=[])
def slow_sensor(context):
    marker = Path(os.environ["SLOW_SENSOR_MARKER"])
    marker.write_text(str(os.getpid()))  # the evaluation has started: the test may signal the daemon now
    time.sleep(SLEEP_S)
    return SkipReason("slept")


defs = Definitions(sensors=[slow_sensor])
