"""Verify from storage alone that committed embeddings, and the published index, cover the manifests exactly once."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow.parquet as pq

from backfill.embed import MARKER, ids_sha256, read_chunks
from backfill.index import IDS_FILE, INDEX_FILE, read_build
from backfill.manifest import list_shards, read_shard
from backfill.publish import read_pointer
from backfill.storage import Layout


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: int
    detail: str


@dataclass(frozen=True)
class ShardRows:
    """A shard's committed rows against its manifest: what both verifications below count."""

    manifest_ids: np.ndarray
    ids: np.ndarray  # committed image ids, in row order
    valid: np.ndarray | None  # per committed row, an embedding rather than a reject; None when not read
    has_marker: bool

    @property
    def missing(self) -> int:
        return len(np.setdiff1d(self.manifest_ids, self.ids))

    @property
    def extra(self) -> int:
        return len(np.setdiff1d(self.ids, self.manifest_ids))

    @property
    def duplicated(self) -> int:
        return len(self.ids) - len(np.unique(self.ids))


def read_shard_rows(layout: Layout, model: str, version: str, shard: str, *, validity: bool = False) -> ShardRows:
    """Read a shard's committed ids (and, with validity, which rows hold an embedding) and its manifest."""
    out = layout.embeddings(model, version, shard)
    manifest = read_shard(layout, shard)
    # the embedding column is read only when asked: it is most of a shard's bytes
    table = read_chunks(layout, out, columns=["image_id", "embedding"] if validity else ["image_id"])
    ids = table.column("image_id").to_numpy() if table is not None else np.zeros(0, np.int64)
    valid = None
    if validity:
        embedded = table.column("embedding").is_valid() if table is not None else None
        valid = embedded.to_numpy(zero_copy_only=False) if embedded is not None else np.zeros(0, bool)
    return ShardRows(manifest.image_ids, ids, valid, layout.store.exists(f"{out}/{MARKER}"))


def verify_shard(layout: Layout, model: str, version: str, shard: str) -> Verdict:
    """One shard's committed rows: a completion marker, and every manifest id exactly once."""
    got = read_shard_rows(layout, model, version, shard)
    if not got.has_marker:
        return Verdict(False, len(got.ids), "no completion marker")
    if got.missing or got.extra or got.duplicated:
        detail = f"{got.missing} missing, {got.extra} not in manifest, {got.duplicated} duplicated"
        return Verdict(False, len(got.ids), detail)
    return Verdict(True, len(got.ids), f"{len(got.ids)} rows, each manifest id exactly once")


@dataclass(frozen=True)
class VersionVerdict:
    """A whole version, from storage alone: every shard's rows, the published index, the pointer."""

    rows: int  # manifest rows over all shards
    rejects: int
    lost: int  # manifest ids with no committed row
    duplicated: int  # committed rows beyond the first of an id
    index_mismatch: int  # ids in the index but not embedded, or embedded but not indexed, or indexed twice
    pointer_ok: bool  # CURRENT names a passed build of this version whose files match its record
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        clean = self.lost == 0 and self.duplicated == 0 and self.index_mismatch == 0
        return clean and self.pointer_ok and not self.problems


def verify_version(layout: Layout, model: str, version: str, expected_rejects: int = 0) -> VersionVerdict:
    """Exactly-once for a version: chunks vs manifests and markers, the published index vs the chunks, CURRENT.

    expected_rejects: the null rows the corpus should yield; on a corpus with no bad images (the
    sample one) any reject is a good image turned into a null row, so a problem too.
    """
    lost = duplicated = rows = rejects = 0
    problems: list[str] = []
    valid_ids = []
    for shard in list_shards(layout):
        got = read_shard_rows(layout, model, version, shard, validity=True)
        lost += got.missing
        duplicated += got.duplicated
        if got.extra:
            problems.append(f"{shard}: {got.extra} ids not in the manifest")
        problems += _marker_problems(layout, model, version, shard, got)
        valid_ids.append(got.ids[got.valid])
        rejects += int((~got.valid).sum())
        rows += len(got.manifest_ids)
    if rejects != expected_rejects:
        problems.append(f"{rejects} rejects where {expected_rejects} were expected")
    expected = np.concatenate(valid_ids) if valid_ids else np.zeros(0, np.int64)
    index_mismatch, pointer_ok = _check_published(layout, model, version, expected, problems)
    return VersionVerdict(rows, rejects, lost, duplicated, index_mismatch, pointer_ok, tuple(problems))


def _marker_problems(layout: Layout, model: str, version: str, shard: str, got: ShardRows) -> list[str]:
    if not got.has_marker:
        return [f"{shard}: no completion marker"]
    marker = layout.store.read_json(f"{layout.embeddings(model, version, shard)}/{MARKER}")
    if marker["ids_sha256"] != ids_sha256(got.manifest_ids) or marker["images"] != len(got.manifest_ids):
        return [f"{shard}: completion marker does not match the manifest"]
    return []


def _check_published(
    layout: Layout, model: str, version: str, expected: np.ndarray, problems: list[str]
) -> tuple[int, bool]:
    """(index_mismatch, pointer_ok) of what CURRENT names, against the ids that hold an embedding."""
    pointer = read_pointer(layout, model)
    if pointer is None or pointer.get("version") != version:
        problems.append(f"CURRENT names {pointer and pointer.get('build_id')}, not a build of {version}")
        return 0, False
    build = read_build(layout, model, pointer["build_id"])
    folder = layout.index_build(model, build.build_id)
    indexed = pq.read_table(io.BytesIO(layout.store.read_bytes(f"{folder}/{IDS_FILE}"))).column("image_id").to_numpy()
    mismatch = len(np.setxor1d(indexed, expected)) + (len(indexed) - len(np.unique(indexed)))
    blob = layout.store.read_bytes(f"{folder}/{INDEX_FILE}")
    ntotal = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)).ntotal
    pointer_ok = (
        build.passed
        and build.version == version
        and hashlib.sha256(blob).hexdigest() == build.index_sha256
        and ntotal == len(indexed)
    )
    return mismatch, pointer_ok
