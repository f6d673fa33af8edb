"""embed_shard: one partition (model version x shard), a short runner over reader, model, writer, grace, finaliser."""

from __future__ import annotations

import time
from collections.abc import Callable

from backfill.config import EmbedConfig
from backfill.errors import ConfigError
from backfill.finalise import (
    MARKER,
    REJECTS,
    EmbedStats,
    finalise,
    ids_sha256,
    read_marker,
    read_rejects,
    reason_kind,
    tally,
)
from backfill.grace import GraceBudget
from backfill.hooks import EmbedHooks, WorkLog
from backfill.manifest import read_shard
from backfill.pipeline import StageClock, ThreadBudget
from backfill.preemption import StopSignal
from backfill.reader import BatchReader
from backfill.runtime import Chunk, LoadedModel
from backfill.storage import Layout
from backfill.writer import ChunkWriter, chunk_name, chunk_plan, is_chunk, load_embeddings, read_chunks

# the names other modules import from here; each lives in its stage's module
__all__ = [
    "MARKER",
    "REJECTS",
    "EmbedStats",
    "chunk_name",
    "chunk_plan",
    "embed_shard",
    "ids_sha256",
    "is_chunk",
    "load_embeddings",
    "read_chunks",
    "read_rejects",
    "reason_kind",
]


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

    Chunk i covers the same rows on every attempt and is committed atomically, so a retried
    partition skips committed chunks and redoes at most the chunk it was in. Bad images become
    rows with a null embedding and a reason. The completion marker (counts, id checksum) is last.

    After a preemption notice (`stop`) the chunk in hand is committed if the rate so far says it
    fits in config.grace_s, else abandoned; then Preempted is raised so the caller retries. The
    hooks (hooks.EmbedHooks, and config.work_log) report progress and let a test kill the run.
    """
    started = time.perf_counter()
    card = model.card
    out = layout.embeddings(card.name, card.version, shard_name)
    stats = EmbedStats(shard_name, card.name, card.version, batch_size=config.images_per_batch, device=config.device)
    hooks = EmbedHooks(progress, on_chunk_committed, on_batch, WorkLog.at(config.work_log, card.version, shard_name))
    shard = read_shard(layout, shard_name)
    plan = chunk_plan(len(shard), config.chunk_size)
    todo = _resume(layout, out, plan, config.chunk_size, stats)
    if todo is None:
        stats.wall_s = time.perf_counter() - started
        return stats
    resumed = sorted(set(plan) - set(todo))  # committed by earlier attempts
    hooks.resumed(sum(e - s for s, e in resumed))

    # one budget (affinity and cgroup CPU limit) for torch, FAISS and the decode pool
    threads = ThreadBudget.resolve(config.torch_threads, config.decode_workers).apply()
    clock = StageClock(stats.stage_s)
    grace = GraceBudget(shard_name, stop, config.grace_s, hooks)
    reader = BatchReader(shard.uris, todo, card.preprocess, config, threads.decode, shard.members)
    writer = ChunkWriter(layout, out, shard.image_ids, config.chunk_size, clock, hooks)
    try:
        for start, end in todo:
            if grace.stopped():
                writer.confirm()  # the chunk in hand (finished within the grace) is committed first
                raise grace.before(start, end, len(writer.committed))
            _embed_chunk(Chunk(model, start, end), reader, writer, grace, clock)
        writer.confirm()
        if grace.stopped() and writer.committed:
            raise grace.after(todo[len(writer.committed) - 1][1])
    finally:
        reader.close()  # stop the stage pools now, not at garbage collection
        writer.close()  # a write under way completes (a chunk is committed whole or not at all)

    stats.images_embedded_now = writer.embedded
    errors = tally(layout, out, resumed, writer.committed, stats)
    stats.timed(started)
    finalise(layout, out, shard, errors, stats, config.max_reject_rate, config.chunk_size)
    return stats


def _embed_chunk(chunk: Chunk, reader: BatchReader, writer: ChunkWriter, grace: GraceBudget, clock: StageClock) -> None:
    """Launch the model on each batch of one chunk, confirming the write before it on the way; then write it."""
    while True:
        with clock("wait_batch"):
            span, (pixels, failed) = next(reader)
        assert span.start == chunk.start, f"batch stream out of order: chunk {span.start} != {chunk.start}"
        with clock("forward"):
            grace.launched(span, chunk.launch(span, pixels, failed))
        if writer.busy() and (writer.finished() or span.last):
            writer.confirm()
            if grace.stopped():
                raise grace.before(chunk.start, chunk.end, len(writer.committed))
        if not writer.busy():
            grace.report(chunk)  # the write before is confirmed: this chunk's batches can be reported
        if span.last:
            break
    writer.submit(chunk)


def _resume(
    layout: Layout, out: str, plan: list[tuple[int, int]], chunk_size: int, stats: EmbedStats
) -> list[tuple[int, int]] | None:
    """The chunks of `plan` still to embed (earlier attempts' commits are kept); None when the shard is complete."""
    store = layout.store
    committed = {n for n in store.ls(out) if is_chunk(n)}
    planned = {chunk_name(s, e) for s, e in plan}
    marker = read_marker(layout, out)
    if marker is not None:
        if planned <= committed:
            marker.resumed(stats)
            return None
        # a chunk went missing after completion (lost data): unmark, then embed what is missing
        store.rm(f"{out}/{MARKER}")
    foreign = committed - planned
    if foreign:
        raise ConfigError(
            f"shard {stats.shard} of {stats.model}/{stats.version} has committed chunks {sorted(foreign)[:3]} that "
            f"do not match chunk_size={chunk_size}; chunk_size must stay fixed for a model version "
            f"(delete {store.display(out)} to start this shard over)"
        )
    todo = [(s, e) for s, e in plan if chunk_name(s, e) not in committed]
    stats.chunks, stats.chunks_resumed = len(plan), len(plan) - len(todo)
    return todo
