"""The finaliser: count the whole shard, gate on its reject rate, write the rejects file, then the marker, last."""

from __future__ import annotations

import hashlib
import io
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backfill.errors import ConfigError, RejectRateError
from backfill.manifest import Shard
from backfill.storage import Layout
from backfill.writer import Committed, chunk_name

MARKER = "_SUCCESS.json"
REJECTS = "rejects.parquet"


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

    def timed(self, started: float) -> None:
        """Set wall_s and the rates from time.perf_counter() at the start; "other" is the main thread's rest."""
        self.wall_s = time.perf_counter() - started
        main = ("wait_batch", "forward", "write_wait")
        self.stage_s["other"] = max(0.0, self.wall_s - sum(self.stage_s.get(k, 0.0) for k in main))
        self.images_per_s = self.images_embedded_now / self.wall_s if self.wall_s else 0.0


@dataclass(frozen=True)
class ShardMarker:
    """The completion marker (_SUCCESS.json) of a shard: its counts and id checksum, written last."""

    shard: str
    model: str
    version: str
    images: int = 0
    embedded: int = 0
    rejects: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    batch_size: int = 0
    device: str = "cpu"
    ids_sha256: str = ""
    chunk_size: int = 0

    @classmethod
    def of(cls, stats: EmbedStats, chunk_size: int) -> "ShardMarker":
        data = asdict(stats)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name != "chunk_size"}, chunk_size=chunk_size)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ShardMarker":
        # unknown keys are ignored, so a marker from a newer release stays readable
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def resumed(self, stats: EmbedStats) -> None:
        """Fill `stats` for a shard found complete: its counts are the marker's, nothing embedded now."""
        for f in fields(self):
            if f.name != "chunk_size":
                setattr(stats, f.name, getattr(self, f.name))
        stats.chunks_resumed, stats.images_embedded_now = stats.chunks, 0


def read_marker(layout: Layout, out: str) -> ShardMarker | None:
    """The marker of a shard folder, or None while the shard is incomplete."""
    if not layout.store.exists(f"{out}/{MARKER}"):
        return None
    return ShardMarker.from_json(layout.store.read_json(f"{out}/{MARKER}"))


def reason_kind(reason: str) -> str:
    """The countable part of a reject reason ("<kind>: <detail>")."""
    return reason.split(":", 1)[0]


def ids_sha256(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def tally(
    layout: Layout, out: str, resumed: list[tuple[int, int]], fresh: list[Committed], stats: EmbedStats
) -> list[str | None]:
    """Count the whole shard: chunks committed by earlier attempts are read back, this attempt's are known.

    Returns the shard's error column in row order (None for embedded rows).
    """
    parts = [(c.start, c.ids, c.errors) for c in fresh]
    for start, end in resumed:
        data = layout.store.read_bytes(f"{out}/{chunk_name(start, end)}")
        table = pq.read_table(io.BytesIO(data), columns=["image_id", "error"])
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


def finalise(
    layout: Layout, out: str, shard: Shard, errors: list[str | None], stats: EmbedStats, max_reject_rate: float,
    chunk_size: int,
) -> ShardMarker:
    """Check the tallied shard, then write its rejects file and its marker; the marker is written last."""
    store = layout.store
    if stats.ids_sha256 != ids_sha256(shard.image_ids):
        raise ConfigError(
            f"shard {stats.shard}: committed chunks do not hold the manifest's ids in order; "
            f"delete {store.display(out)}"
        )
    if stats.images and stats.rejects / stats.images > max_reject_rate:
        top = ", ".join(f"{k} ({v})" for k, v in stats.top_reasons())
        # the rejects may have a systemic cause (a decoder, a mount): drop the chunks so a
        # rerun after the fix embeds the shard again instead of resuming past them
        store.rm(out, recursive=True)
        raise RejectRateError(
            f"shard {stats.shard}: {stats.rejects}/{stats.images} images rejected "
            f"({stats.rejects / stats.images:.1%} > max_reject_rate {max_reject_rate:.1%}); top reasons: {top}; "
            "its chunks were removed so that a rerun starts the shard over"
        )
    write_rejects(layout, out, shard, errors)
    marker = ShardMarker.of(stats, chunk_size)
    store.write_json(f"{out}/{MARKER}", marker.to_json())
    return marker


def write_rejects(layout: Layout, out: str, shard: Shard, errors: list[str | None]) -> None:
    """rejects.parquet: image_id, uri, reason of every rejected row of the shard (queryable, before the marker).

    `errors` is the whole shard's error column in row order, as tally assembled it (its
    id checksum has matched the manifest, so row i is manifest row i).
    """
    rows = [i for i, e in enumerate(errors) if e is not None]
    uris = [_printable(shard.uris[i]) for i in rows]
    rejects = pa.table(
        {
            "image_id": pa.array(shard.image_ids[rows], pa.int64()),
            "uri": pa.array(uris, pa.string()),
            "reason": pa.array([errors[i] for i in rows], pa.string()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(rejects, buf)
    layout.store.write_bytes(f"{out}/{REJECTS}", buf.getvalue())


def _printable(uri: str | None) -> str | None:
    # a manifest uri with undecodable bytes (surrogate escapes) is kept readable rather than failing the file
    return None if uri is None else uri.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_rejects(layout: Layout, model: str, version: str, shard: str) -> pa.Table:
    """The rejects table of a completed shard: image_id, uri, reason."""
    return pq.read_table(io.BytesIO(layout.store.read_bytes(f"{layout.embeddings(model, version, shard)}/{REJECTS}")))
