"""The reader stage: rows fetched, decoded and cut into batches that never cross a chunk boundary, in order."""

import numpy as np
import pyarrow as pa
import pytest

from backfill.config import EmbedConfig
from backfill.manifest import read_shard, write_shard
from backfill.reader import BatchReader, Span, flattened, grouped, spans

CONFIG = EmbedConfig(batch_size=4, chunk_size=6, fetch_workers=2, decode_workers=1, torch_threads=1)


def test_spans_cut_at_batch_size_and_at_chunk_ends():
    # a staged item is anything but a str; a str is the row's reject reason
    decoded = iter([(r, ("pixels", r)) if r != 7 else (r, "missing object: x") for r in range(6, 18)])
    cut = list(spans(decoded, [(6, 12), (12, 18)], batch_size=4))
    assert [(s.start, s.offsets, s.seen, s.last) for s in cut] == [
        (6, [0, 2, 3, 4], 5, False),
        (6, [5], 6, True),  # the chunk ends: its last span is short, never filled from the next chunk
        (12, [0, 1, 2, 3], 4, False),
        (12, [4, 5], 6, True),
    ]
    assert cut[0].rejects == [(1, "missing object: x")] and cut[0].items[0] == ("pixels", 6)


def test_spans_refuse_an_out_of_order_stream():
    with pytest.raises(AssertionError, match="decoded stream out of order: 7 != 6"):
        list(spans(iter([(7, ("pixels", 7))]), [(6, 8)], batch_size=4))


def test_a_chunk_of_rejects_only_gives_one_empty_last_span():
    (span,) = spans(iter([(0, "bad: a"), (1, "bad: b")]), [(0, 2)], batch_size=4)
    assert span == Span(0, [], [], [(0, "bad: a"), (1, "bad: b")], seen=2, last=True)


def test_grouped_and_flattened_round_trip_and_close_the_source():
    closed = []

    def source():
        try:
            yield from grouped(range(7), 3)
        finally:
            closed.append(True)

    assert list(grouped(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    flat = flattened(source())
    assert next(flat) == 0
    flat.close()
    assert closed == [True]


def test_batch_reader_yields_the_rows_to_do_as_device_batches(registered, tmp_path):
    layout, card = registered
    good = read_shard(layout, "shard-00000").uris[:10]
    uris = [*good[:3], str(tmp_path / "missing.jpg"), *good[3:]]
    table = pa.table({"image_id": pa.array(range(11), pa.int64()), "uri": pa.array(uris, pa.string())})
    write_shard(layout, "odd", table)
    shard = read_shard(layout, "odd")
    reader = BatchReader(shard.uris, [(0, 6), (6, 11)], card.input_size, CONFIG, decode_workers=1)
    try:
        batches = [next(reader) for _ in range(4)]
    finally:
        reader.close()
    cuts = [(span.start, span.seen, span.last) for span, _ in batches]
    assert cuts == [(0, 5, False), (0, 6, True), (6, 4, False), (6, 5, True)]
    first, (pixels, failed) = batches[0]
    assert first.rejects == [(3, f"missing object: {tmp_path / 'missing.jpg'}")] and failed == {}
    assert pixels.shape == (4, 3, card.input_size, card.input_size) and pixels.dtype.is_floating_point is False
    assert np.array_equal(first.offsets, [0, 1, 2, 4])


def test_batch_reader_close_stops_it_before_the_end(registered):
    layout, card = registered
    shard = read_shard(layout, "shard-00000")
    reader = BatchReader(shard.uris, [(0, 6), (6, 12), (12, 18), (18, 20)], card.input_size, CONFIG, decode_workers=1)
    next(reader)
    reader.close()  # returns: the stage pools are shut down, nothing is left running
    with pytest.raises(StopIteration):
        next(reader)
