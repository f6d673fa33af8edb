"""What embed_shard reports as it goes, and where a test or a harness can observe or kill it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class WorkLog:
    """A file every attempt appends "<pid> <version> <shard> <n>" to per embedded batch.

    A kill loses the attempt's memory but not this file, so the images embedded and never
    committed (the cost of a preemption) can still be counted; the chaos harness parses it.
    """

    path: str
    version: str
    shard: str

    @classmethod
    def at(cls, path: str | None, version: str, shard: str) -> "WorkLog | None":
        """The work log of one partition, or None when no path is configured."""
        return cls(path, version, shard) if path else None

    def __call__(self, n: int) -> None:
        # one short O_APPEND write per batch: lines from concurrent processes never interleave
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {self.version} {self.shard} {n}\n".encode())
        finally:
            os.close(fd)


@dataclass(frozen=True)
class EmbedHooks:
    """Callbacks of one embed_shard call, each optional.

    `on_chunk_committed(i)` runs once chunk i is committed and `on_batch(n)` once a batch of n
    images is embedded (before its chunk is committed): raising from either is a kill at that
    point, the crash_at idea of faiss contrib/big_batch_search.py, so a test can stop a run
    halfway, resume it and compare with an uninterrupted one.
    """

    progress: Callable[[int], None] | None = None  # rows committed, resumed chunks included
    on_chunk_committed: Callable[[int], None] | None = None
    on_batch: Callable[[int], None] | None = None
    work_log: WorkLog | None = None

    def batch(self, n: int) -> None:
        if self.work_log is not None:
            self.work_log(n)  # first: a hook that kills the run after this batch still has it counted
        if self.on_batch is not None:
            self.on_batch(n)

    def committed(self, index: int, rows: int) -> None:
        if self.progress is not None:
            self.progress(rows)
        if self.on_chunk_committed is not None:
            self.on_chunk_committed(index)

    def resumed(self, rows: int) -> None:
        if self.progress is not None and rows:
            self.progress(rows)
