"""Bounded, ordered, overlapped stages: a thread pool that never runs ahead by more than a window."""

from __future__ import annotations

import os
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
