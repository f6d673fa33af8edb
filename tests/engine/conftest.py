import time

import pytest


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch):
    """Engine tests are deterministic: nothing waits on a clock."""

    def refuse(seconds):
        raise AssertionError(f"time.sleep({seconds}) in an engine test")

    monkeypatch.setattr(time, "sleep", refuse)
