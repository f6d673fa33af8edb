"""embed_shard: one partition (model version x shard), written as atomic chunks, resumable."""

from __future__ import annotations

import hashlib
import io
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backfill.config import EmbedConfig
from backfill.errors import ConfigError, Preempted, RejectRateError
from backfill.feed import Preprocessor, flattened, grouped
from backfill.images import BadImage, fetch_many
from backfill.manifest import read_shard
from backfill.pipeline import Prefetched, ThreadBudget, bounded_map
from backfill.preemption import StopSignal
from backfill.runtime import LoadedModel
from backfill.storage import Layout

MARKER = "_SUCCESS.json"
REJECTS = "rejects.parquet"
STAGE_GROUP = 16  # rows per fetch/decode task: amortises the thread hand-off (~20 us) at GPU rates


def chunk_name(start: int, end: int) -> str:
    # the row range is in the name, so a resume can tell a chunk of another chunk_size from a missing one
    return f"rows-{start:012d}-{end:012d}.parquet"


def is_chunk(name: str) -> bool:
    return name.startswith("rows-") and name.endswith(".parquet")


def chunk_plan(rows: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, rows)) for s in range(0, rows, chunk_size)]


@dataclass
class EmbedStats:
    shard: str
    model: str
    version: str
    images: int = 0
    embedded: int = 0
    rejects: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    chunks_resumed: int = 0  # committed by an earlier attempt, not redone
    images_embedded_now: int = 0  # work done by this attempt (wasted-work accounting)
    wall_s: float = 0.0
    images_per_s: float = 0.0
    batch_size: int = 0
    device: str = "cpu"
    ids_sha256: str = ""
    # where the time went, seconds: the main thread's wait_batch (for the next prepared batch),
    # forward (queueing the model; on a CPU the model itself), write_wait (for the chunk writer),
    # other (the rest of wall_s); the writer thread's writer_results (for the device) and writer_write
    stage_s: dict[str, float] = field(default_factory=dict)

    def top_reasons(self, n: int = 3) -> list[tuple[str, int]]:
        return Counter(self.reasons).most_common(n)


def reason_kind(reason: str) -> str:
    """The countable part of a reject reason ("<kind>: <detail>")."""
    return reason.split(":", 1)[0]


def embed_shard(
    layout: Layout,
    shard_name: str,
    model: LoadedModel,
    config: EmbedConfig,
    *,
    progress: Callable[[int], None] | None = None,
    on_chunk_committed: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    stop: StopSignal | None = None,
) -> EmbedStats:
    """Embed every row of a manifest shard with one model version.

    Chunk i covers the same rows on every attempt and is committed atomically, so a
    retried partition skips committed chunks and redoes at most the chunk it was in.
    Bad images become rows with a null embedding and a reason. The completion marker
    (counts and an id checksum) is written last.

    When `stop` is set (a preemption notice), the chunk in hand is finished and committed
    if the rate so far says it fits in config.grace_s, else abandoned; then Preempted is
    raised so the caller retries. `on_batch(n)` reports every n images embedded (work
    accounting: images embedded but never committed are the cost of a kill).
    """
    started = time.perf_counter()
    card = model.card
    out = layout.embeddings(card.name, card.version, shard_name)
    batch_size = config.images_per_batch
    stats = EmbedStats(shard=shard_name, model=card.name, version=card.version, batch_size=batch_size, device=config.device)
    store = layout.store
    shard = read_shard(layout, shard_name)
    plan = chunk_plan(len(shard), config.chunk_size)
    committed = {n for n in store.ls(out) if is_chunk(n)}
    if store.exists(f"{out}/{MARKER}"):
        done = store.read_json(f"{out}/{MARKER}")
        if {chunk_name(s, e) for s, e in plan} <= committed:
            stats.__dict__.update({k: v for k, v in done.items() if k in stats.__dict__})
            stats.chunks_resumed, stats.images_embedded_now = stats.chunks, 0
            stats.wall_s = time.perf_counter() - started
            return stats
        # a chunk went missing after completion (lost data): unmark, then embed what is missing
        store.rm(f"{out}/{MARKER}")
    foreign = committed - {chunk_name(s, e) for s, e in plan}
    if foreign:
        raise ConfigError(
            f"shard {shard_name} of {card.name}/{card.version} has committed chunks {sorted(foreign)[:3]} that do not "
            f"match chunk_size={config.chunk_size}; chunk_size must stay fixed for a model version "
            f"(delete {store.display(out)} to start this shard over)"
        )
    todo = [(s, e) for s, e in plan if chunk_name(s, e) not in committed]
    stats.chunks, stats.chunks_resumed = len(plan), len(plan) - len(todo)
    if progress and stats.chunks_resumed:
        progress(sum(e - s for s, e in plan if chunk_name(s, e) in committed))

    # one budget (affinity and cgroup CPU limit) for torch, FAISS and the decode pool
    threads = ThreadBudget.resolve(config.torch_threads, config.decode_workers).apply()
    prep = Preprocessor(card.input_size, config.max_image_pixels, config.device, config.gpu_decode)

    def decode_rows(items: list[tuple[int, bytes | str]]) -> list[tuple[int, object]]:
        out: list[tuple[int, object]] = []
        for row, data in items:
            if isinstance(data, str):
                out.append((row, data))
                continue
            try:
                out.append((row, prep.stage(data)))
            except BadImage as exc:
                out.append((row, str(exc)))
        return out

    # fetch (I/O threads) -> decode (CPU threads) -> batch assembly (one thread: on CUDA nvjpeg and
    # the host-to-device copy on a stream of their own) -> a prefetch thread that drives all of them,
    # config.prefetch_batches ahead of the model, so the main thread only launches and commits
    rows = grouped((r for s, e in todo for r in range(s, e)), STAGE_GROUP)
    per_batch = -(-batch_size // STAGE_GROUP)
    fetched = None
    if prep.gpu_decode:
        # on the nvjpeg path staging is a header parse (microseconds): it runs in the fetch task,
        # saving a pool of threads that would wake per group while the main thread launches kernels
        decoded = fetch_many(shard.uris, rows, config.fetch_workers, then=decode_rows, ahead=2 * per_batch)
    else:
        fetched = fetch_many(shard.uris, rows, config.fetch_workers)
        decode_workers = threads.decode
        decoded = bounded_map(decode_rows, fetched, decode_workers, window=2 * decode_workers + per_batch)

    prepared = bounded_map(prep.prepare, _spans(flattened(decoded), todo, batch_size), 1, window=2)
    batches = Prefetched(prepared, config.prefetch_batches, name="prefetch-batches")
    clock = _StageClock(stats.stage_s)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-writer")
    fresh: list[tuple[int, np.ndarray, list[str | None]]] = []  # (start, ids, errors) of chunks written now
    inflight: list = []  # at most one chunk: (_Chunk, future of its write)

    def confirm() -> None:
        """Wait for the chunk in the writer; it is committed: account for it and call back."""
        if not inflight:
            return
        chunk, future = inflight.pop()
        with clock("write_wait"):
            future.result()
        fresh.append((chunk.start, shard.image_ids[chunk.start : chunk.end], chunk.errors))
        stats.images_embedded_now += chunk.embedded
        if progress:
            progress(chunk.end - chunk.start)
        if on_chunk_committed:
            on_chunk_committed(chunk.start // config.chunk_size)

    def write(chunk: _Chunk) -> None:  # on the writer thread
        with clock("writer_results"):
            vectors, valid = chunk.collect()
        with clock("writer_write"):
            _write_chunk(layout, out, chunk.start, chunk.end, shard.image_ids[chunk.start : chunk.end], vectors, valid, chunk.errors)

    def preempted_before(start: int, end: int) -> Preempted:
        return Preempted(f"shard {shard_name}: stopped ({stop.reason}) before rows {start}-{end}; {len(fresh)} chunks committed now")

    try:
        for start, end in todo:
            if stop is not None and stop.is_set():
                confirm()  # the chunk in hand (finished within the grace) is committed first
                raise preempted_before(start, end)
            chunk = _Chunk(model, start, end)
            # While the chunk before is being written, this chunk's batches are launched but not yet
            # reported (on_batch, the notice check): a notice that comes with that commit stops here,
            # before these rows, exactly as if the write had been done before them
            unreported: list = []
            while True:
                with clock("wait_batch"):
                    span, (pixels, failed) = next(batches)
                assert span.start == start, f"batch stream out of order: chunk {span.start} != {start}"
                with clock("forward"):
                    n = chunk.launch(span, pixels, failed)
                unreported.append((span, n))
                if inflight and (inflight[0][1].done() or span.last):
                    confirm()
                    if stop is not None and stop.is_set():
                        raise preempted_before(start, end)
                if not inflight:
                    for done_span, done_n in unreported:
                        chunk.report(done_span, done_n, on_batch, stop, config.grace_s)
                    unreported.clear()
                if span.last:
                    break
            inflight.append((chunk, writer.submit(write, chunk)))
        confirm()
        if stop is not None and stop.is_set() and fresh:
            raise Preempted(f"shard {shard_name}: stopped ({stop.reason}) after committing rows up to {todo[len(fresh) - 1][1]}")
    finally:
        batches.close()  # stop the stage pools now, not at garbage collection
        decoded.close()
        if fetched is not None:
            fetched.close()
        writer.shutdown(wait=True)  # a write under way completes (a chunk is committed whole or not at all)

    errors = _tally(layout, out, [(s, e) for s, e in plan if chunk_name(s, e) in committed], fresh, stats)
    stats.wall_s = time.perf_counter() - started
    main = ("wait_batch", "forward", "write_wait")
    stats.stage_s["other"] = max(0.0, stats.wall_s - sum(stats.stage_s.get(k, 0.0) for k in main))
    stats.images_per_s = stats.images_embedded_now / stats.wall_s if stats.wall_s else 0.0
    expected_sha = ids_sha256(shard.image_ids)
    if stats.ids_sha256 != expected_sha:
        raise ConfigError(f"shard {shard_name}: committed chunks do not hold the manifest's ids in order; delete {store.display(out)}")
    if stats.images and stats.rejects / stats.images > config.max_reject_rate:
        top = ", ".join(f"{k} ({v})" for k, v in stats.top_reasons())
        # the rejects may have a systemic cause (a decoder, a mount): drop the chunks so a
        # rerun after the fix embeds the shard again instead of resuming past them
        store.rm(out, recursive=True)
        raise RejectRateError(
            f"shard {shard_name}: {stats.rejects}/{stats.images} images rejected "
            f"({stats.rejects / stats.images:.1%} > max_reject_rate {config.max_reject_rate:.1%}); top reasons: {top}; "
            "its chunks were removed so that a rerun starts the shard over"
        )
    _write_rejects(layout, out, shard, errors)
    marker = {k: v for k, v in asdict(stats).items() if k not in ("wall_s", "images_per_s", "chunks_resumed", "images_embedded_now", "stage_s")}
    marker["chunk_size"] = config.chunk_size
    store.write_json(f"{out}/{MARKER}", marker)
    return stats


@dataclass
class Span:
    """Rows of one batch: consecutive rows of one chunk, at most batch_size of them embeddable."""

    start: int  # the chunk's first row
    offsets: list[int] = field(default_factory=list)  # chunk offsets of the staged items
    items: list = field(default_factory=list)
    rejects: list[tuple[int, str]] = field(default_factory=list)  # (chunk offset, reason)
    seen: int = 0  # chunk offset one past the last row in this span
    last: bool = False  # the chunk ends with this span


def _spans(decoded, todo: list[tuple[int, int]], batch_size: int):
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


class _Chunk:
    """The rows start..end of one chunk: its batches' pending vectors, its reject reasons."""

    def __init__(self, model: LoadedModel, start: int, end: int) -> None:
        self.model, self.start, self.end = model, start, end
        self.errors: list[str | None] = [None] * (end - start)
        self.parts: list[tuple[list[int], object]] = []  # (chunk offsets, PendingEmbedding)
        self.embedded = 0
        self.began = time.monotonic()

    def launch(self, span: Span, pixels, failed: dict[int, str]) -> int:
        """Queue the model on a prepared batch; its rejects keep their reason. Returns the rows embedded."""
        for i, reason in span.rejects:
            self.errors[i] = reason
        for j, reason in failed.items():
            self.errors[span.offsets[j]] = reason
        rows = [i for j, i in enumerate(span.offsets) if j not in failed]
        if rows:
            self.parts.append((rows, self.model.embed_pixels_async(pixels)))
            self.embedded += len(rows)
        return len(rows)

    def report(
        self,
        span: Span,
        rows: int,
        on_batch: Callable[[int], None] | None,
        stop: StopSignal | None,
        grace_s: float,
    ) -> None:
        """Account for a launched batch; on a preemption notice, finish the chunk only if it fits the grace."""
        if rows and on_batch:
            on_batch(rows)  # reported before the chunk is committed: a kill before then still counts it
        if rows and stop is not None and stop.is_set():
            done = span.seen
            # the rest of the chunk at the rate so far, with a margin for the write and for
            # the notice itself arriving late (the handler runs between bytecodes)
            needed = 1.25 * (time.monotonic() - self.began) / done * (self.end - self.start - done) + 0.5
            if needed > stop.seconds_left(grace_s):
                raise Preempted(
                    f"stopped ({stop.reason}) in rows {self.start}-{self.end}: finishing needed ~{needed:.1f}s, "
                    f"{max(0.0, stop.seconds_left(grace_s)):.1f}s of grace left; chunk abandoned"
                )

    def collect(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (n, dim) float32, valid mask): waits for the device."""
        vectors = np.zeros((self.end - self.start, self.model.card.dim), dtype=np.float32)
        valid = np.zeros(self.end - self.start, dtype=bool)
        for rows, pending in self.parts:
            vectors[rows] = pending.result()
            valid[rows] = True
        return vectors, valid


class _StageClock:
    """Seconds spent per stage, summed into `totals` (EmbedStats.stage_s); one key per thread's stage."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.totals = totals

    @contextmanager
    def __call__(self, stage: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - began


def ids_sha256(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def _write_chunk(
    layout: Layout,
    out: str,
    start: int,
    end: int,
    ids: np.ndarray,
    vectors: np.ndarray,
    valid: np.ndarray,
    errors: list[str | None],
) -> None:
    dim = vectors.shape[1]
    half = np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1)
    # zero-copy from the fp16 buffer: pa.array(float16 ndarray) converts value by value (~70 ms
    # for 1024 x 2048), a large share of a GPU's time per chunk
    values = pa.Array.from_buffers(pa.float16(), len(half), [None, pa.py_buffer(half)])
    embedding = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))
    table = pa.table({"image_id": pa.array(ids, type=pa.int64()), "embedding": embedding, "error": pa.array(errors, type=pa.string())})
    buf = io.BytesIO()
    # no dictionary for the vectors (distinct values: a dictionary is built, then dropped, ~90 ms a chunk)
    pq.write_table(table, buf, use_dictionary=["error"])
    layout.store.write_bytes(f"{out}/{chunk_name(start, end)}", buf.getvalue())


def _write_rejects(layout: Layout, out: str, shard, errors: list[str | None]) -> None:
    """rejects.parquet: image_id, uri, reason of every rejected row of the shard (queryable, before the marker).

    `errors` is the whole shard's error column in row order, as _tally assembled it (its
    id checksum has matched the manifest, so row i is manifest row i).
    """
    rows = [i for i, e in enumerate(errors) if e is not None]
    uris = [shard.uris[i] for i in rows]
    rejects = pa.table(
        {
            "image_id": pa.array(shard.image_ids[rows], pa.int64()),
            "uri": pa.array([None if u is None else u.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for u in uris], pa.string()),
            "reason": pa.array([errors[i] for i in rows], pa.string()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(rejects, buf)
    layout.store.write_bytes(f"{out}/{REJECTS}", buf.getvalue())


def read_rejects(layout: Layout, model: str, version: str, shard: str) -> pa.Table:
    """The rejects table of a completed shard: image_id, uri, reason."""
    return pq.read_table(io.BytesIO(layout.store.read_bytes(f"{layout.embeddings(model, version, shard)}/{REJECTS}")))


def read_chunks(layout: Layout, out: str, columns: list[str] | None = None) -> pa.Table | None:
    """All committed chunks of a shard, in row order (None when there are none)."""
    names = [n for n in layout.store.ls(out) if is_chunk(n)]
    if not names:
        return None
    tables = [pq.read_table(io.BytesIO(layout.store.read_bytes(f"{out}/{n}")), columns=columns) for n in names]
    return pa.concat_tables(tables)


def _tally(
    layout: Layout,
    out: str,
    resumed: list[tuple[int, int]],
    fresh: list[tuple[int, np.ndarray, list[str | None]]],
    stats: EmbedStats,
) -> list[str | None]:
    """Count the whole shard: chunks committed by earlier attempts are read back, this attempt's are known.

    Returns the shard's error column in row order (None for embedded rows).
    """
    parts = list(fresh)
    for start, end in resumed:
        table = pq.read_table(io.BytesIO(layout.store.read_bytes(f"{out}/{chunk_name(start, end)}")), columns=["image_id", "error"])
        parts.append((start, table.column("image_id").to_numpy(), table.column("error").to_pylist()))
    parts.sort(key=lambda part: part[0])
    errors = [e for _, _, part_errors in parts for e in part_errors]
    rejects = [e for e in errors if e is not None]
    ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    stats.images = len(ids)
    stats.rejects = len(rejects)
    stats.embedded = stats.images - stats.rejects
    stats.reasons = dict(Counter(reason_kind(e) for e in rejects))
    stats.ids_sha256 = ids_sha256(ids)
    return errors


def load_embeddings(layout: Layout, model: str, version: str, shard: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_ids, vectors float32 (n, dim) with zeros for rejects, valid mask) of a completed shard."""
    table = read_chunks(layout, layout.embeddings(model, version, shard), columns=["image_id", "embedding"])
    if table is None:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, bool)
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    valid = emb.is_valid().to_numpy(zero_copy_only=False)
    vectors = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return table.column("image_id").to_numpy(), vectors, valid
