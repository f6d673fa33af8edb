"""A preemption notice: SIGTERM sets it, the engine stops at a chunk boundary within a grace period."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator


class StopSignal:
    """Set once when the process is told to stop; remembers when, so work can be budgeted against a grace period."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.at: float | None = None
        self.reason = ""

    def set(self, reason: str = "stop requested") -> None:
        if not self._event.is_set():
            self.at, self.reason = time.monotonic(), reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def seconds_left(self, grace_s: float) -> float:
        """Grace time remaining since the notice (inf when no notice has come)."""
        return float("inf") if self.at is None else grace_s - (time.monotonic() - self.at)


@contextlib.contextmanager
def sigterm_notice() -> Iterator[StopSignal]:
    """Turn SIGTERM into a StopSignal for the duration of the block (main thread only).

    Kubernetes sends SIGTERM, waits terminationGracePeriodSeconds, then SIGKILLs: the
    engine uses that window to commit the chunk in hand instead of dying mid-chunk.
    The previous handler is restored afterwards.
    """
    stop = StopSignal()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals are only delivered to the main thread; nothing to install
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signo, frame: stop.set("SIGTERM"))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
