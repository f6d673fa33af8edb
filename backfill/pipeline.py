"""Bounded, ordered, overlapped stages: a thread pool that never runs ahead by more than a window."""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
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


CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu", "")  # where distributions mount the v1 cpu controller

log = logging.getLogger(__name__)


def cgroup_cpu_limit(
    root: str | os.PathLike | None = None, proc_cgroup: str | os.PathLike | None = None
) -> float | None:
    """The CPU limit of this process in CPUs (quota / period), or None when unlimited or unknown.

    cgroup v2: `cpu.max` holds "<quota|max> <period>". cgroup v1: `cpu.cfs_quota_us` (-1:
    unlimited) and `cpu.cfs_period_us` in the cpu controller's folder. A Kubernetes
    `limits.cpu` becomes this quota; the node's core count says nothing about it. The
    process's own cgroup (from /proc/self/cgroup) and every ancestor up to the root are read
    and the tightest limit wins: without a private cgroup namespace the root is the host's,
    and a pod's limit sits both on the pod's and the container's cgroup.
    """
    base = Path(root if root is not None else CGROUP_ROOT)
    own = _own_cgroups(Path(proc_cgroup if proc_cgroup is not None else PROC_CGROUP))
    limits = [_v2_limit(f) for f in _upwards(base, own.get("", "/"), "cpu.max")]
    if not limits:
        for sub in _V1_CPU_DIRS:
            quotas = _upwards(base / sub, own.get("cpu", "/"), "cpu.cfs_quota_us")
            limits += [_v1_limit(q, q.with_name("cpu.cfs_period_us")) for q in quotas]
            if quotas:
                break
    finite = [x for x in limits if x is not None]
    return min(finite) if finite else None


def cpu_budget(cgroup_root: str | os.PathLike | None = None) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup CPU limit (at least 1).

    A fractional limit rounds down (2.5 CPUs -> 2 threads): more runnable threads than the
    quota get throttled every period, the oversubscription loss this exists to avoid.
    """
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cpus = max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return cpus


@dataclass(frozen=True)
class ThreadBudget:
    """Thread counts for one process, all derived from the same CPU budget."""

    cpus: int
    torch: int
    decode: int
    faiss: int

    @classmethod
    def resolve(cls, torch_threads: int = 0, decode_workers: int = 0, cpus: int | None = None) -> "ThreadBudget":
        """0 means "one per CPU of the budget"; explicit settings win."""
        cpus = cpus or cpu_budget()
        return cls(cpus=cpus, torch=torch_threads or cpus, decode=decode_workers or cpus, faiss=cpus)

    def apply(self) -> "ThreadBudget":
        """Set torch intra-op and FAISS OpenMP threads (decode workers are sized by the caller)."""
        import torch

        torch.set_num_threads(self.torch)
        try:
            import faiss
        except ImportError:  # an embedding-only process (a GPU bench image) needs no FAISS
            return self
        faiss.omp_set_num_threads(self.faiss)
        return self


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """{controller or "" (v2): path} from /proc/self/cgroup lines "id:controllers:path"."""
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return {}
    own = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                own[controller] = parts[2]
    return own


def _upwards(base: Path, own: str, name: str) -> list[Path]:
    """`name` in the process's cgroup folder and each ancestor up to `base`, where present."""
    found, rel = [], Path(own.strip() or "/")
    for folder in [rel, *rel.parents]:
        path = base / str(folder).lstrip("/") / name
        if path.is_file() and path not in found:
            found.append(path)
    if (base / name).is_file() and base / name not in found:
        found.append(base / name)
    return found


def _v2_limit(path: Path) -> float | None:
    text = _read(path)
    parts = text.split() if text is not None else []
    if len(parts) == 2 and parts[0] == "max":
        return None
    return _ratio(path, parts[0] if len(parts) == 2 else None, parts[1] if len(parts) == 2 else None)


def _v1_limit(quota_file: Path, period_file: Path) -> float | None:
    quota, period = _read(quota_file), _read(period_file)
    if quota is not None and quota.strip() == "-1":
        return None
    return _ratio(quota_file, quota, period)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError as exc:
        log.warning("cannot read cgroup file %s (%s); ignoring the CPU limit", path, exc)
        return None


def _ratio(path: Path, quota: str | None, period: str | None) -> float | None:
    try:
        q, p = int(str(quota).strip()), int(str(period).strip())
    except ValueError:
        log.warning(
            "cgroup file %s holds quota %r period %r, not integers; ignoring the CPU limit", path, quota, period
        )
        return None
    if q <= 0 or p <= 0:
        log.warning("cgroup file %s holds quota %d period %d, not positive; ignoring the CPU limit", path, q, p)
        return None
    return q / p


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


class StageClock:
    """Seconds spent per stage, summed into `totals` (EmbedStats.stage_s); one key per thread's stage."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.totals = totals

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - began
