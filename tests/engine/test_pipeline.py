"""Prefetched: the stage thread that feeds the model, bounded, ordered, errors passed on, closable."""

import threading

import pytest

from backfill.pipeline import Prefetched


def test_prefetched_keeps_order_and_stays_within_depth():
    pulled = {i: threading.Event() for i in range(20)}

    def items():
        for i in range(20):
            pulled[i].set()
            yield i

    it = Prefetched(items(), depth=3)
    assert next(it) == 0
    # one handed over, three queued, one more pulled and waiting for room: no further
    assert pulled[4].wait(timeout=5)
    assert not pulled[5].wait(timeout=0.2)
    assert next(it) == 1
    assert pulled[5].wait(timeout=5)
    assert [next(it) for _ in range(18)] == list(range(2, 20))
    with pytest.raises(StopIteration):
        next(it)
    it.close()


def test_prefetched_raises_the_source_error_in_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        raise ValueError("decode pool broke")

    it = Prefetched(items(), depth=2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="decode pool broke"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_close_stops_the_thread_and_closes_the_source_on_that_thread():
    closed_on = []

    def items():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed_on.append(threading.current_thread().name)

    it = Prefetched(items(), depth=2, name="feeder")
    assert next(it) == 0
    it.close()
    assert closed_on == ["feeder"]
    with pytest.raises(StopIteration):
        next(it)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="prefetch depth must be >= 1, got 0"):
        Prefetched(iter([]), depth=0)
