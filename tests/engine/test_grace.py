"""The grace budget: batches reported once the write before is confirmed; after a notice, a chunk finishes in time."""

import time

import pytest

from backfill.errors import Preempted
from backfill.grace import GraceBudget
from backfill.hooks import EmbedHooks
from backfill.preemption import StopSignal
from backfill.reader import Span


class FakeChunk:
    """The rows 6..12 of a shard, begun `age` seconds ago (the rate so far is what the budget extrapolates)."""

    def __init__(self, age: float) -> None:
        self.start, self.end, self.began = 6, 12, time.monotonic() - age


def budget(grace_s: float, reported: list, stop: StopSignal | None = None) -> GraceBudget:
    return GraceBudget("shard-7", stop, grace_s, EmbedHooks(on_batch=reported.append))


def test_batches_are_held_until_reported_and_empty_batches_are_not_reported():
    reported: list[int] = []
    grace = budget(20, reported)
    grace.launched(Span(6, seen=2), 2)
    grace.launched(Span(6, seen=3), 0)  # a batch of rejects only: nothing embedded
    assert reported == []  # the write before this chunk is not confirmed yet
    grace.report(FakeChunk(age=1))
    grace.report(FakeChunk(age=1))  # held batches are reported once
    assert reported == [2] and not grace.stopped()


def test_a_notice_with_time_left_lets_the_chunk_finish():
    stop, reported = StopSignal(), []
    grace = budget(20, reported, stop)
    stop.set("test")
    grace.launched(Span(6, seen=3), 3)
    grace.report(FakeChunk(age=1))  # 3 more rows at 1 s / 3 rows: ~1.75 s needed, ~20 s left
    assert reported == [3] and grace.stopped()


def test_a_notice_without_time_left_abandons_the_chunk_after_counting_the_batch():
    stop, reported = StopSignal(), []
    grace = budget(0, reported, stop)
    stop.set("test")
    grace.launched(Span(6, seen=2), 2)
    abandoned = r"stopped \(test\) in rows 6-12: finishing needed ~.*s, 0.0s of grace left; chunk abandoned"
    with pytest.raises(Preempted, match=abandoned):
        grace.report(FakeChunk(age=0))
    assert reported == [2]  # the work was done before the chunk was abandoned: it is counted


def test_a_slow_chunk_does_not_fit_a_short_grace():
    stop, reported = StopSignal(), []
    grace = budget(5, reported, stop)
    stop.set("test")
    grace.launched(Span(6, seen=1), 1)
    with pytest.raises(Preempted, match="chunk abandoned"):
        grace.report(FakeChunk(age=2))  # 5 more rows at 2 s a row: ~12.5 s needed, 5 s left


def test_the_errors_name_the_shard_and_the_rows():
    stop = StopSignal()
    stop.set("SIGTERM")
    grace = budget(20, [], stop)
    assert str(grace.before(12, 18, 2)) == "shard shard-7: stopped (SIGTERM) before rows 12-18; 2 chunks committed now"
    assert str(grace.after(20)) == "shard shard-7: stopped (SIGTERM) after committing rows up to 20"
    assert not budget(20, []).stopped()
