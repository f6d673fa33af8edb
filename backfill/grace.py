"""The preemption grace budget: after a notice, the chunk in hand is finished only if it fits the grace period."""

from __future__ import annotations

import time

from backfill.errors import Preempted
from backfill.hooks import EmbedHooks
from backfill.preemption import StopSignal
from backfill.reader import Span
from backfill.runtime import Chunk


class GraceBudget:
    """Where a preemption notice (StopSignal) stops one shard, and what is reported before that.

    Batches launched while the chunk before is being written are held back (not reported to
    `hooks.batch`, the notice not checked against them) until that write is confirmed, so a
    notice that comes with that commit stops before these rows, exactly as if the write had
    been done before them.
    """

    def __init__(self, shard: str, stop: StopSignal | None, grace_s: float, hooks: EmbedHooks) -> None:
        self.shard, self.stop, self.grace_s, self.hooks = shard, stop, grace_s, hooks
        self._held: list[tuple[Span, int]] = []  # (span, rows embedded) launched, not yet reported

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def before(self, start: int, end: int, committed_now: int) -> Preempted:
        """The error for a notice seen before rows start..end were begun (or while the write before them ran)."""
        reason = self.stop.reason if self.stop is not None else ""
        return Preempted(
            f"shard {self.shard}: stopped ({reason}) before rows {start}-{end}; {committed_now} chunks committed now"
        )

    def after(self, committed_up_to: int) -> Preempted:
        """The error for a notice that came while the last chunks were finished and committed."""
        reason = self.stop.reason if self.stop is not None else ""
        return Preempted(f"shard {self.shard}: stopped ({reason}) after committing rows up to {committed_up_to}")

    def launched(self, span: Span, rows: int) -> None:
        self._held.append((span, rows))

    def report(self, chunk: Chunk) -> None:
        """Report the held batches of `chunk` (no write in flight now); Preempted if the chunk cannot finish in time."""
        held, self._held = self._held, []
        for span, rows in held:
            self._check(chunk, span, rows)

    def _check(self, chunk: Chunk, span: Span, rows: int) -> None:
        if rows:
            self.hooks.batch(rows)  # reported before the chunk is committed: a kill before then still counts it
        if rows and self.stopped():
            assert self.stop is not None
            done = span.seen
            # the rest of the chunk at the rate so far, with a margin for the write and for
            # the notice itself arriving late (the handler runs between bytecodes)
            needed = 1.25 * (time.monotonic() - chunk.began) / done * (chunk.end - chunk.start - done) + 0.5
            left = self.stop.seconds_left(self.grace_s)
            if needed > left:
                raise Preempted(
                    f"stopped ({self.stop.reason}) in rows {chunk.start}-{chunk.end}: finishing needed ~{needed:.1f}s, "
                    f"{max(0.0, left):.1f}s of grace left; chunk abandoned"
                )
