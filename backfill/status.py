"""backfill status VERSION: a backfill's progress and ETA from the committed chunks and markers on storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from backfill.finalise import MARKER
from backfill.plan import hms
from backfill.report import RunFacts
from backfill.storage import Layout
from backfill.writer import is_chunk

RUNNING = ("STARTED", "STARTING")


@dataclass
class Progress:
    """Where a version's backfill stands: shards done, running, left; images committed; rate and ETA."""

    model: str
    version: str
    shards: int = 0
    done: int = 0
    running: list[tuple[str, int, int]] = field(default_factory=list)  # (shard, rows committed, rows)
    images: int = 0
    committed: int = 0  # rows in committed chunks (done shards included)
    first_s: float | None = None  # epoch: the first run queued, else the first chunk committed
    last_s: float | None = None  # epoch: the last chunk or marker written
    active: bool = False  # a run is in progress (Dagster) or, without Dagster, shards are part-done

    @property
    def left(self) -> int:
        return self.shards - self.done - len(self.running)

    def img_s(self, now: float) -> float | None:
        """Committed rows over the time since the backfill began (to now while it runs)."""
        if self.first_s is None or self.last_s is None:
            return None
        span = (now if self.active else self.last_s) - self.first_s
        return self.committed / span if span > 0 and self.committed else None

    def eta_s(self, now: float) -> float | None:
        rate = self.img_s(now)
        return (self.images - self.committed) / rate if rate else None


def progress(
    layout: Layout, model: str, version: str, rows: dict[str, int], runs: list[RunFacts] | None, now: float
) -> Progress:
    """One listing per shard folder (chunk names carry their rows); runs, when given, say what is running."""
    p = Progress(model, version, shards=len(rows), images=sum(rows.values()))
    live = {r.shard for r in runs or [] if r.status in RUNNING}
    times = []
    for shard, total in rows.items():
        entries = _listing(layout, layout.embeddings(model, version, shard))
        names = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}
        committed = sum(_rows(n) for n in names if is_chunk(n))
        times += [t for t in (_mtime(e) for n, e in names.items() if is_chunk(n) or n == MARKER) if t]
        p.committed += committed
        if MARKER in names:
            p.done += 1
        elif shard in live or (runs is None and committed):
            p.running.append((shard, committed, total))
    p.active = bool(live) if runs is not None else bool(p.running)
    queued = [r.created for r in runs or []]
    p.first_s = min(queued) if queued else (min(times) if times else None)
    p.last_s = max(times) if times else None
    return p


def describe(p: Progress, now: float) -> str:
    """Lines for the terminal: the headline, then each running shard."""
    share = f"{p.committed / p.images:.0%}" if p.images else "-"
    rate, eta = p.img_s(now), p.eta_s(now)
    head = (
        f"{p.model} {p.version}: {p.done}/{p.shards} shards done, {len(p.running)} running, {p.left} left; "
        f"{p.committed:,}/{p.images:,} images committed ({share})"
    )
    if p.done == p.shards and p.shards:
        took = hms(p.last_s - p.first_s) if p.first_s is not None and p.last_s is not None else "?"
        lines = [f"{head}; complete in {took}" + (f" ({rate:,.1f} img/s)" if rate else "")]
    else:
        timing = f"{rate:,.1f} img/s, ETA {hms(eta)}" if rate and eta is not None else "no rate yet"
        lines = [f"{head}; {timing}" + ("" if p.active else " (nothing running now)")]
    lines += [f"  running: {s} ({c:,}/{t:,} rows committed)" for s, c, t in p.running]
    return "\n".join(lines)


def _listing(layout: Layout, folder: str) -> list[dict[str, Any]]:
    try:
        return layout.store.fs.ls(folder, detail=True, refresh=True)
    except FileNotFoundError:
        return []


def _rows(chunk: str) -> int:
    """rows-<start>-<end>.parquet (writer.chunk_name) -> end - start."""
    start, end = chunk[len("rows-") : -len(".parquet")].split("-")
    return int(end) - int(start)


def _mtime(entry: dict[str, Any]) -> float | None:
    """Modification time in epoch seconds: local filesystems say mtime, object stores LastModified."""
    value = entry.get("mtime", entry.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else None
