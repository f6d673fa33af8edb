"""The chunk writer: one write in flight, commits whole and in order, read back as written."""

import threading

import numpy as np
import pytest

from backfill.hooks import EmbedHooks
from backfill.pipeline import StageClock
from backfill.storage import Layout, Store
from backfill.writer import ChunkWriter, chunk_name, chunk_plan, is_chunk, read_chunks, write_chunk

DIM = 3


class FakeChunk:
    """What the writer reads of a runtime.Chunk; collect() waits for `release` (the device, in real life)."""

    def __init__(self, start: int, end: int, release: threading.Event | None = None) -> None:
        self.start, self.end, self.embedded = start, end, end - start - 1
        self.errors = [None] * (end - start - 1) + ["missing object: x"]
        self.release = release

    def collect(self):
        if self.release is not None:
            assert self.release.wait(timeout=10)
        n = self.end - self.start
        vectors = np.tile(np.arange(DIM, dtype=np.float32), (n, 1)) + self.start
        return vectors, np.array([True] * (n - 1) + [False])


def test_chunk_names_carry_their_rows_and_the_plan_covers_the_shard():
    assert chunk_name(0, 6) == "rows-000000000000-000000000006.parquet" and is_chunk(chunk_name(6, 12))
    assert not is_chunk("rejects.parquet") and not is_chunk("_SUCCESS.json")
    assert chunk_plan(20, 6) == [(0, 6), (6, 12), (12, 18), (18, 20)] and chunk_plan(0, 6) == []


def _layout(tmp_path) -> tuple[Layout, str]:
    layout = Layout(Store.open(str(tmp_path)))
    return layout, layout.store.url("out")


def test_write_chunk_round_trips_with_null_embeddings_for_rejects(tmp_path):
    layout, out = _layout(tmp_path)
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_chunk(layout, out, 0, 2, np.array([7, 8]), vectors, np.array([True, False]), [None, "bad: x"])
    table = read_chunks(layout, out)
    assert table.column("image_id").to_pylist() == [7, 8] and table.column("error").to_pylist() == [None, "bad: x"]
    assert table.column("embedding").to_pylist() == [[0.0, 1.0, 2.0], None]
    assert read_chunks(layout, layout.store.url("nothing-here")) is None


def test_one_write_in_flight_committed_in_order_with_callbacks(tmp_path):
    layout, out = _layout(tmp_path)
    stage_s: dict[str, float] = {}
    calls = []
    hooks = EmbedHooks(
        progress=lambda rows: calls.append(("rows", rows)), on_chunk_committed=lambda i: calls.append(("chunk", i))
    )
    writer = ChunkWriter(layout, out, np.arange(100, 110), 4, StageClock(stage_s), hooks)
    release = threading.Event()
    try:
        writer.submit(FakeChunk(0, 4, release))
        assert writer.busy() and not writer.finished()
        with pytest.raises(AssertionError, match="one chunk write in flight at most"):
            writer.submit(FakeChunk(4, 8))
        assert layout.store.ls(out) == []  # nothing is visible before the write is done
        release.set()
        writer.confirm()
        assert not writer.busy() and calls == [("rows", 4), ("chunk", 0)]
        writer.submit(FakeChunk(4, 8))
        writer.confirm()
        writer.confirm()  # nothing in flight: a no-op
    finally:
        writer.close()
    assert [c.start for c in writer.committed] == [0, 4] and writer.embedded == 6
    second = writer.committed[1]
    assert second.ids.tolist() == [104, 105, 106, 107] and second.errors[-1] == "missing object: x"
    assert layout.store.ls(out) == [chunk_name(0, 4), chunk_name(4, 8)]
    assert read_chunks(layout, out, columns=["image_id"]).column("image_id").to_pylist() == list(range(100, 108))
    assert {"write_wait", "writer_results", "writer_write"} == set(stage_s)


def test_close_lets_the_write_under_way_complete(tmp_path):
    layout, out = _layout(tmp_path)
    writer = ChunkWriter(layout, out, np.arange(4), 4, StageClock({}), EmbedHooks())
    release = threading.Event()
    writer.submit(FakeChunk(0, 4, release))
    threading.Timer(0.05, release.set).start()
    writer.close()  # as after an error in the runner: the chunk is committed whole, not cut off
    assert layout.store.ls(out) == [chunk_name(0, 4)]
