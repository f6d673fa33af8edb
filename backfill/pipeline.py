"""Bounded, ordered, overlapped stages: a thread pool that never runs ahead by more than a window."""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """Like map(fn, items) in order, on `workers` threads, with at most `window` items in flight.

    The window bounds memory (at most `window` results wait for the consumer) while
    letting slow items (a slow object fetch) overlap with fast ones.
    """
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=getattr(fn, "__name__", "stage"))
    futures: deque[Future[R]] = deque()
    try:
        for item in items:
            futures.append(pool.submit(fn, item))
            if len(futures) >= window:
                yield futures.popleft().result()
        while futures:
            yield futures.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask (cgroup quotas come with the k8s issue)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Prefetched(Iterator[T]):
    """Iterate `items` on a thread of its own, at most `depth` results ahead of the consumer.

    The thread drives everything `items` pulls (the fetch and decode pools' submissions, the
    batch assembly), so a consumer busy elsewhere (launching kernels, writing a chunk) no
    longer stalls the stages feeding it. Exceptions reach the consumer in order. close()
    stops the thread, which closes `items` itself (a generator is closed by the thread that
    runs it).
    """

    _END = object()

    def __init__(self, items: Iterator[T], depth: int, name: str = "prefetch") -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put((True, item)):
                    return
            self._put((False, self._END))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((False, exc))
        finally:
            close = getattr(self._items, "close", None)
            if close:
                close()

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        ok, item = self._queue.get()
        if ok:
            return item
        self._done = True
        if item is self._END:
            raise StopIteration
        raise item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a put
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._done = True
