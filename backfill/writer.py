"""The chunk writer: one chunk write in flight on a thread of its own, each chunk committed atomically, in order."""

from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backfill.hooks import EmbedHooks
from backfill.pipeline import StageClock
from backfill.storage import Layout

if TYPE_CHECKING:  # torch: the index steps and the definitions read chunks without it
    from backfill.runtime import Chunk


def chunk_name(start: int, end: int) -> str:
    # the row range is in the name, so a resume can tell a chunk of another chunk_size from a missing one
    return f"rows-{start:012d}-{end:012d}.parquet"


def is_chunk(name: str) -> bool:
    return name.startswith("rows-") and name.endswith(".parquet")


def chunk_plan(rows: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, rows)) for s in range(0, rows, chunk_size)]


@dataclass(frozen=True)
class Committed:
    """A chunk this attempt committed: what the finaliser needs without reading it back."""

    start: int
    ids: np.ndarray
    errors: list[str | None]


class ChunkWriter:
    """Writes the chunks of one shard folder, at most one at a time, while the caller embeds the next.

    submit() hands a chunk to the writer thread (which waits for the device, then commits);
    confirm() waits for that write and accounts for it: the caller confirms before it submits
    again, so commits are in row order. close() lets a write under way complete: a chunk is
    committed whole or not at all.
    """

    def __init__(
        self, layout: Layout, out: str, image_ids: np.ndarray, chunk_size: int, clock: StageClock, hooks: EmbedHooks
    ) -> None:
        self.layout, self.out, self.image_ids, self.chunk_size = layout, out, image_ids, chunk_size
        self.clock, self.hooks = clock, hooks
        self.committed: list[Committed] = []  # this attempt's, in row order
        self.embedded = 0  # images embedded in this attempt's committed chunks
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-writer")
        self._inflight: tuple[Chunk, Future] | None = None

    def busy(self) -> bool:
        """A write is in flight (submitted, not yet confirmed)."""
        return self._inflight is not None

    def finished(self) -> bool:
        """The write in flight is done (confirm() will not wait)."""
        return self._inflight is not None and self._inflight[1].done()

    def submit(self, chunk: Chunk) -> None:
        assert self._inflight is None, "one chunk write in flight at most: confirm() the one before"
        self._inflight = (chunk, self._pool.submit(self._write, chunk))

    def confirm(self) -> None:
        """Wait for the chunk in the writer; it is committed: account for it and call back."""
        if self._inflight is None:
            return
        chunk, future = self._inflight
        self._inflight = None
        with self.clock("write_wait"):
            future.result()
        self.committed.append(Committed(chunk.start, self.image_ids[chunk.start : chunk.end], chunk.errors))
        self.embedded += chunk.embedded
        self.hooks.committed(chunk.start // self.chunk_size, chunk.end - chunk.start)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _write(self, chunk: Chunk) -> None:  # on the writer thread
        with self.clock("writer_results"):
            vectors, valid = chunk.collect()
        with self.clock("writer_write"):
            ids = self.image_ids[chunk.start : chunk.end]
            write_chunk(self.layout, self.out, chunk.start, chunk.end, ids, vectors, valid, chunk.errors)


def write_chunk(
    layout: Layout,
    out: str,
    start: int,
    end: int,
    ids: np.ndarray,
    vectors: np.ndarray,
    valid: np.ndarray,
    errors: list[str | None],
) -> None:
    """Commit rows start..end as one object (Store.write_bytes: temporary name, then rename / single PUT)."""
    dim = vectors.shape[1]
    half = np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1)
    # zero-copy from the fp16 buffer: pa.array(float16 ndarray) converts value by value (~70 ms
    # for 1024 x 2048), a large share of a GPU's time per chunk
    values = pa.Array.from_buffers(pa.float16(), len(half), [None, pa.py_buffer(half)])
    embedding = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))
    error = pa.array(errors, type=pa.string())
    table = pa.table({"image_id": pa.array(ids, type=pa.int64()), "embedding": embedding, "error": error})
    buf = io.BytesIO()
    # no dictionary for the vectors (distinct values: a dictionary is built, then dropped, ~90 ms a chunk)
    pq.write_table(table, buf, use_dictionary=["error"])
    layout.store.write_bytes(f"{out}/{chunk_name(start, end)}", buf.getvalue())


def read_chunks(layout: Layout, out: str, columns: list[str] | None = None) -> pa.Table | None:
    """All committed chunks of a shard, in row order (None when there are none)."""
    names = [n for n in layout.store.ls(out) if is_chunk(n)]
    if not names:
        return None
    tables = [pq.read_table(io.BytesIO(layout.store.read_bytes(f"{out}/{n}")), columns=columns) for n in names]
    return pa.concat_tables(tables)


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
