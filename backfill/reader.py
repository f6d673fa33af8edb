"""The reader stage: a shard's rows fetched, decoded and batched, every step bounded, in row order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from backfill.config import EmbedConfig
from backfill.feed import Preprocessor
from backfill.images import BadImage, make_fetcher
from backfill.pipeline import Prefetched, bounded_map
from backfill.preprocess import Preprocess
from backfill.tar import READS_IN_FLIGHT, MemberRanges, TarRead, plan, read_members

STAGE_GROUP = 16  # rows per fetch/decode task: amortises the thread hand-off (~20 us) at GPU rates


@dataclass
class Span:
    """Rows of one batch: consecutive rows of one chunk, at most batch_size of them embeddable."""

    start: int  # the chunk's first row
    offsets: list[int] = field(default_factory=list)  # chunk offsets of the staged items
    items: list = field(default_factory=list)
    rejects: list[tuple[int, str]] = field(default_factory=list)  # (chunk offset, reason)
    seen: int = 0  # chunk offset one past the last row in this span
    last: bool = False  # the chunk ends with this span


Batch = tuple[Span, tuple[Any, dict[int, str]]]  # (span, (pixels on the device or None, {position: reason}))


class BatchReader(Iterator[Batch]):
    """Prepared batches of the rows `todo` of a shard, `config.prefetch_batches` ahead of the model.

    fetch (I/O threads) -> decode (CPU threads) -> batch assembly (`config.assembly_workers` threads, in
    order: on CUDA nvjpeg and the host-to-device copy, each thread on a stream of its own) -> a prefetch thread
    that drives all of them,
    so the consumer only launches the model and commits. Batches never cross a chunk boundary.
    close() stops every stage's pool now, not at garbage collection.
    """

    def __init__(
        self,
        uris: list,
        todo: list[tuple[int, int]],
        contract: int | Preprocess,
        config: EmbedConfig,
        decode_workers: int,
        members: MemberRanges | None = None,
    ) -> None:
        """`contract`: the model's preprocessing (card.preprocess); a bare input size means squash.
        `members`: the shard's tar members (Shard.members), read many per request (backfill/tar.py)."""
        # nvImageCodec's decoders (one per assembly thread) share the decode workers' CPUs: on the GPU path
        # no decode pool runs (staging is a header parse), and its host threads do the Huffman decode
        self.prep = Preprocessor(
            contract,
            config.max_image_pixels,
            config.device,
            config.gpu_decode,
            gpu_decoder=config.gpu_decoder,
            decoder_threads=max(1, decode_workers // config.assembly_workers),
        )
        batch_size = config.images_per_batch
        rows = fetch_tasks(uris, todo, members)
        # a tar read carries up to tar.READ_BYTES: fewer of them in flight bound the memory they hold
        workers = config.fetch_workers if members is None else min(config.fetch_workers, READS_IN_FLIGHT)
        per_batch = -(-batch_size // STAGE_GROUP)
        self._fetched: Iterator | None = None
        if self.prep.gpu_decode:
            # on the nvjpeg path staging is a header parse (microseconds): it runs in the fetch task,
            # saving a pool of threads that would wake per group while the main thread launches kernels
            # (2 tar reads ahead, not 2 batches' worth: each one carries many rows and up to tar.READ_BYTES)
            ahead = 2 * per_batch if members is None else 2
            self._decoded = fetch_many(uris, rows, workers, then=self.decode_rows, ahead=ahead, members=members)
        else:
            # a tar read's members go on to the decode pool in groups, as plain rows do
            self._fetched = regrouped(fetch_many(uris, rows, workers, members=members), STAGE_GROUP)
            window = 2 * decode_workers + per_batch
            self._decoded = bounded_map(self.decode_rows, self._fetched, decode_workers, window=window)
        assemblers = config.assembly_workers
        batches = spans(flattened(self._decoded), todo, batch_size)
        prepared = bounded_map(self.prep.prepare, batches, assemblers, window=2 * assemblers)
        self._batches = Prefetched(prepared, config.prefetch_batches, name="prefetch-batches")

    def decode_rows(self, items: list[tuple[int, bytes | str]]) -> list[tuple[int, object]]:
        """(row, bytes) -> (row, staged pixels); a fetch reject, or a decode failure, stays (row, reason)."""
        out: list[tuple[int, object]] = []
        for row, data in items:
            if isinstance(data, str):
                out.append((row, data))
                continue
            try:
                out.append((row, self.prep.stage(data)))
            except BadImage as exc:
                out.append((row, str(exc)))
        return out

    def __next__(self) -> Batch:
        return next(self._batches)

    def close(self) -> None:
        self._batches.close()
        self._decoded.close()  # type: ignore[attr-defined]  # a generator
        if self._fetched is not None:
            self._fetched.close()  # type: ignore[attr-defined]


def spans(decoded: Iterator[tuple[int, object]], todo: list[tuple[int, int]], batch_size: int) -> Iterator[Span]:
    """Cut the decoded row stream into batches that never cross a chunk boundary."""
    for start, end in todo:
        span = Span(start)
        for i in range(end - start):
            row, result = next(decoded)
            assert row == start + i, f"decoded stream out of order: {row} != {start + i}"
            if isinstance(result, str):
                span.rejects.append((i, result))
            else:
                span.offsets.append(i)
                span.items.append(result)
            span.seen = i + 1
            if len(span.items) == batch_size and i < end - start - 1:
                yield span
                span = Span(start)
        span.last = True
        yield span


def fetch_tasks(uris, todo: list[tuple[int, int]], members: MemberRanges | None) -> Iterator[list[int] | TarRead]:
    """The fetch stage's tasks: groups of STAGE_GROUP rows, one request each; with tar members, one
    ranged read per run of a tar's members in each chunk (tar.plan), so resuming a chunk reads no other."""
    if members is None:
        yield from grouped((r for s, e in todo for r in range(s, e)), STAGE_GROUP)
        return
    for start, end in todo:
        yield from plan(list(range(start, end)), uris, members, STAGE_GROUP)


def fetch_many(
    uris,
    groups: Iterable[list[int] | TarRead],
    workers: int,
    then: Callable[[list], list] | None = None,
    ahead: int = 2,
    members: MemberRanges | None = None,
) -> Iterator[list]:
    """Lists of (row, bytes) in row order, `workers` requests in flight; a bad image gives (row, reason).

    Object-store GETs are latency-bound (tens of ms to first byte), so throughput is requests
    in flight / latency. Each task fetches one group of rows (fewer thread handoffs per image);
    at most workers + `ahead` groups wait for the consumer, which bounds memory. `then`, if
    given, runs on each fetched group inside the same task (a cheap next stage). Outages raise
    RetryableError: an unreachable store is never taken for a missing image. A TarRead task is one
    ranged request for many tar members (`members` gives their ranges).
    """
    fetch = make_fetcher()

    def fetch_rows(rows: list[int] | TarRead) -> list[tuple[int, bytes | str]]:
        if isinstance(rows, TarRead):
            assert members is not None, "a TarRead needs the shard's member ranges"
            members_read = read_members(fetch, rows, uris, members)
            return then(members_read) if then else members_read
        out: list[tuple[int, bytes | str]] = []
        for row in rows:
            try:
                out.append((row, fetch(uris[row])))
            except BadImage as exc:
                out.append((row, str(exc)))
        return then(out) if then else out

    return bounded_map(fetch_rows, groups, workers, window=workers + ahead)


def grouped(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def regrouped(groups: Iterator[list[Any]], size: int) -> Iterator[list[Any]]:
    """Each list cut into lists of at most `size` items, in order; closing it closes the source."""
    try:
        for group in groups:
            for i in range(0, len(group), size):
                yield group[i : i + size]
    finally:
        close = getattr(groups, "close", None)
        if close:
            close()


def flattened(groups: Iterator[list[Any]]) -> Iterator[Any]:
    """The items of consecutive lists; closing it closes the source (its worker pools)."""
    try:
        for group in groups:
            yield from group
    finally:
        close = getattr(groups, "close", None)
        if close:
            close()
