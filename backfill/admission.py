"""Admission for the search service: a bounded number of searches in flight, a bounded wait queue, a deadline."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Overloaded(Exception):
    """No search slot for this request: the caller answers 503 with Retry-After."""


class DeadlineExceeded(Exception):
    """An admitted search ran past its deadline: the caller answers 504."""


class Admission:
    """At most `max_in_flight` searches run (each in its own worker thread), at most `max_queued` wait for one.

    A request beyond both is refused at once, and a queued one that waits longer than `queue_wait_s` is
    refused then, so an overload answers quickly instead of piling up connections and memory. A search
    past its deadline answers 504 but keeps its slot until its thread really ends: a thread cannot be
    stopped, and releasing the slot early would let the CPU work in flight grow past the bound.
    Used from one event loop; not thread-safe.
    """

    def __init__(self, max_in_flight: int, max_queued: int, queue_wait_s: float) -> None:
        self.max_in_flight, self.max_queued, self.queue_wait_s = max_in_flight, max_queued, queue_wait_s
        self.in_flight = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None  # made on first use, so an app that never searches has none

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def run(self, deadline_s: float, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a worker thread once a slot is free; Overloaded or DeadlineExceeded otherwise."""
        await self._acquire()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="search")
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.shield(future), deadline_s)
        except TimeoutError:
            raise DeadlineExceeded(f"the search took longer than its deadline of {deadline_s:g} s") from None

    async def _acquire(self) -> None:
        if self.in_flight < self.max_in_flight and not self._waiting:
            self.in_flight += 1
            return
        if len(self._waiting) >= self.max_queued:
            raise Overloaded(
                f"{self.in_flight} searches in flight and {len(self._waiting)} waiting (the limits): try again shortly"
            )
        slot = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            await asyncio.wait_for(asyncio.shield(slot), self.queue_wait_s)
        except TimeoutError:
            if slot.done():  # handed a slot just as the wait ended: give it on
                self._release()
            else:
                self._waiting.remove(slot)
                slot.cancel()
            raise Overloaded(f"no search slot within {self.queue_wait_s:g} s: try again shortly") from None
        except asyncio.CancelledError:  # the client went away while waiting
            if slot.done():
                self._release()
            else:
                self._waiting.remove(slot)
            raise

    def _release(self) -> None:
        # hand the slot straight to the oldest waiter, so in_flight never dips and overshoots
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.in_flight -= 1

    def _finished(self, future: asyncio.Future) -> None:
        self._release()
        if not future.cancelled() and future.exception() is not None:
            # read here too, so a search that outlived its deadline and then failed is not an unread error
            log.debug("search ended with %r", future.exception())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
