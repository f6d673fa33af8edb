"""The reader stage: rows fetched, decoded and cut into batches that never cross a chunk boundary, in order."""

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from backfill import tar as tar_mod
from backfill.config import EmbedConfig
from backfill.ingest import ingest
from backfill.manifest import read_shard, write_shard
from backfill.reader import BatchReader, Span, flattened, grouped, spans
from backfill.tar import MemberRanges, TarRead
from backfill.tar import plan as plan_reads

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


def test_several_assembly_workers_give_the_same_batches_in_the_same_order(registered, monkeypatch):
    import dataclasses
    import threading

    from backfill.feed import Preprocessor

    layout, card = registered
    shard = read_shard(layout, "shard-00000")
    todo = [(0, 6), (6, 12), (12, 18), (18, 20)]

    def read(workers: int) -> list:
        reader = BatchReader(
            shard.uris, todo, card.input_size, dataclasses.replace(CONFIG, assembly_workers=workers), 1
        )
        try:
            return [((span.start, span.seen, span.last), pixels.clone()) for span, (pixels, _) in reader]
        finally:
            reader.close()

    one = read(1)
    threads, prepare, later_began, overtaken = set(), Preprocessor.prepare, threading.Event(), []

    def first_waits_for_a_later_one(self, span):
        threads.add(threading.get_ident())
        if (span.start, span.seen) == (0, 4):
            # the first batch finishes only once a later one was being assembled: handed over first all the same
            overtaken.append(later_began.wait(timeout=10))
        else:
            later_began.set()
        return prepare(self, span)

    monkeypatch.setattr(Preprocessor, "prepare", first_waits_for_a_later_one)
    three = read(3)
    assert [cut for cut, _ in three] == [cut for cut, _ in one] and len(one) == 7
    assert all(a.equal(b) for (_, a), (_, b) in zip(one, three, strict=True))
    assert overtaken == [True]
    assert len(threads) > 1  # the batches were assembled on several threads


def test_batch_reader_close_stops_it_before_the_end(registered):
    layout, card = registered
    shard = read_shard(layout, "shard-00000")
    reader = BatchReader(shard.uris, [(0, 6), (6, 12), (12, 18), (18, 20)], card.input_size, CONFIG, decode_workers=1)
    next(reader)
    reader.close()  # returns: the stage pools are shut down, nothing is left running
    with pytest.raises(StopIteration):
        next(reader)


# ---- WebDataset tars: a chunk's members of one tar in one ranged read ---------------------------------------


def _tar_of(path, uris: list[str], extra: bool = True) -> None:
    """A WebDataset-style tar: each image as NNNNNN.jpg, with a .json (and a .cls) member beside it."""
    with tarfile.open(path, "w") as tar:
        for i, uri in enumerate(uris):
            with open(uri, "rb") as f:
                data = f.read()
            members = [(f"{i:06d}.jpg", data)] + ([(f"{i:06d}.json", b"{}"), (f"{i:06d}.cls", b"3")] if extra else [])
            for name, blob in members:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


@pytest.fixture
def counted_reads(monkeypatch):
    """Every read the fetch stage makes of a local file: (path, start, end)."""
    reads = []
    original = LocalFileSystem.cat_file

    def cat_file(self, path, start=None, end=None, **kwargs):
        reads.append((os.path.basename(path), start, end))
        return original(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", cat_file)
    return reads


def _read_all(shard, todo, card):
    reader = BatchReader(shard.uris, todo, card.input_size, CONFIG, decode_workers=1, members=shard.members)
    try:
        return list(reader)
    finally:
        reader.close()


def _tar_shard(layout, tmp_path, plain):
    _tar_of(tmp_path / "a.tar", plain.uris)
    ((name, *_),) = ingest(layout, str(tmp_path / "a.tar"), shard_size=1000).shards
    return read_shard(layout, name)


TODO = [(0, 6), (6, 12), (12, 18), (18, 20)]  # CONFIG.chunk_size 6: four chunks of the 20 rows


def test_a_chunks_members_of_one_tar_are_one_read_and_decode_as_the_files_do(registered, tmp_path, counted_reads):
    layout, card = registered
    plain = read_shard(layout, "shard-00000")
    counted_reads.clear()
    from_files = _read_all(plain, TODO, card)
    assert len(counted_reads) == 20  # one request per image file
    tarred = _tar_shard(layout, tmp_path, plain)
    counted_reads.clear()
    from_tar = _read_all(tarred, TODO, card)
    assert [r[0] for r in counted_reads] == ["a.tar"] * 4  # one ranged read per chunk, not 20 requests
    # each read runs from the chunk's first member's header to its last member's end
    for (_, start, end), (first, last) in zip(sorted(counted_reads, key=lambda r: r[1]), TODO):
        assert (start, end) == (
            tarred.members.offsets[first] - 512,
            tarred.members.offsets[last - 1] + tarred.members.sizes[last - 1],
        )
    assert len(from_tar) == len(from_files) == 7
    for (span_f, (pix_f, failed_f)), (span_t, (pix_t, failed_t)) in zip(from_files, from_tar):
        assert (span_t.offsets, span_t.rejects, failed_t) == (span_f.offsets, [], failed_f)
        assert np.array_equal(pix_t.numpy(), pix_f.numpy())  # byte-identical input: identical pixels


def test_a_span_longer_than_the_cap_is_split_into_ceil_span_over_cap_reads(
    registered, tmp_path, counted_reads, monkeypatch
):
    layout, card = registered
    tarred = _tar_shard(layout, tmp_path, read_shard(layout, "shard-00000"))
    span = int(tarred.members.offsets[5] + tarred.members.sizes[5] - (tarred.members.offsets[0] - 512))
    cap = -(-span // 3)  # the first chunk's six members need three reads of at most `cap` bytes
    monkeypatch.setattr(tar_mod, "READ_BYTES", cap)
    counted_reads.clear()
    _read_all(tarred, [(0, 6)], card)
    assert len(counted_reads) >= 3 and all(end - start <= cap for _, start, end in counted_reads)
    assert len(counted_reads) <= 6  # members are never split: a read holds whole members only


def test_plan_groups_runs_of_one_tar_and_leaves_plain_rows_as_groups():
    uris = ["/a.tar#0.jpg", "/a.tar#1.jpg", "/b.tar#0.jpg", "/p.jpg", "/q.jpg", "/a.tar#9.jpg", "/a.tar#10.jpg"]
    offsets = np.array([512, 2048, 512, -1, -1, 10 << 20, 4096], np.int64)
    ranges = MemberRanges(offsets, np.array([1000, 1000, 10, -1, -1, 10, 10], np.int64))
    tasks = list(plan_reads(list(range(7)), uris, ranges, group=16))
    assert tasks == [
        TarRead("/a.tar", 0, 3048, [0, 1]),
        TarRead("/b.tar", 0, 522, [2]),
        [3, 4],
        TarRead("/a.tar", (10 << 20) - 512, (10 << 20) + 10, [5]),
        TarRead("/a.tar", 3584, 4106, [6]),  # before the previous read: a new one, never a read backwards
    ]


def test_a_missing_tar_a_cut_tar_and_a_moved_member_are_rejects_with_reasons(registered, tmp_path):
    layout, card = registered
    tarred = _tar_shard(layout, tmp_path, read_shard(layout, "shard-00000"))
    tar_path = str(tmp_path / "a.tar")
    offsets, sizes = tarred.members.offsets.copy(), tarred.members.sizes.copy()
    uris = [*tarred.uris[:4], tarred.uris[4].replace("a.tar", "gone.tar")]
    offsets[1] += 1  # no header before it: the tar changed since ingest
    with open(tar_path, "r+b") as f:
        f.truncate(int(offsets[3]) + 10)  # the tar now ends inside member 3
    table = pa.table(
        {
            "image_id": pa.array(range(5), pa.int64()),
            "uri": uris,
            "tar_offset": pa.array(offsets[:5], pa.int64()),
            "tar_size": pa.array(sizes[:5], pa.int64()),
        }
    )
    write_shard(layout, "damaged", table)
    shard = read_shard(layout, "damaged")
    ((span, _),) = _read_all(shard, [(0, 5)], card)[:1]
    reasons = dict(span.rejects)
    assert span.offsets == [0, 2] and sorted(reasons) == [1, 3, 4]
    assert reasons[1].startswith(f"tar member moved: {uris[1]}")
    assert reasons[3] == f"missing tar member: {uris[3]} (the tar ends at byte {offsets[3] + 10})"
    assert reasons[4].startswith(f"missing object: {tmp_path / 'gone.tar'}") and uris[4] in reasons[4]
