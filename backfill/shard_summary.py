"""Per-shard id summaries, recorded once: a sorted-id sidecar per shard and one catalog of id ranges."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backfill.errors import ManifestError
from backfill.manifest import read_shard
from backfill.storage import Layout

# derived data, rebuilt from the manifests when lost; kept out of corpus/ (the user's listing)
FOLDER = "manifest-index"
CATALOG = "catalog.parquet"


def summaries_dir(layout: Layout) -> str:
    return layout.store.url(FOLDER)


def sidecar_path(layout: Layout, shard: str) -> str:
    return layout.store.url(FOLDER, "ids", f"{shard}.npy")


@dataclass(frozen=True)
class ShardSummary:
    """What the cross-shard checks need to know about one valid shard without reading it."""

    name: str
    rows: int
    min_id: int  # -1 for an empty shard (no range: it overlaps nothing)
    max_id: int

    def overlaps(self, other: ShardSummary) -> bool:
        return self.rows > 0 and other.rows > 0 and self.min_id <= other.max_id and other.min_id <= self.max_id


@dataclass
class Catalog:
    """Summaries of the shards validated so far and the shards refused (with the reason)."""

    summaries: dict[str, ShardSummary] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def summarise(layout: Layout, shard: str) -> tuple[ShardSummary, np.ndarray]:
    """Validate a manifest shard (read_shard's contract), write its sorted ids next to the catalog.

    The sidecar is written atomically and is the same for the same manifest, so a retry is safe.
    """
    ids = np.sort(read_shard(layout, shard).image_ids)
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    layout.store.write_bytes(sidecar_path(layout, shard), buf.getvalue())
    summary = ShardSummary(shard, len(ids), int(ids[0]) if len(ids) else -1, int(ids[-1]) if len(ids) else -1)
    return summary, ids


def read_ids(layout: Layout, summary: ShardSummary) -> np.ndarray:
    """The sorted ids of a summarised shard; ManifestError if its sidecar is gone or does not match."""
    path = sidecar_path(layout, summary.name)
    try:
        ids = np.load(io.BytesIO(layout.store.read_bytes(path)), allow_pickle=False)
    except FileNotFoundError:
        raise ManifestError(
            f"shard {summary.name!r}: sorted-id sidecar missing at {layout.store.display(path)}; "
            f"delete {layout.store.display(summaries_dir(layout))}/{CATALOG} and the registry sensor rebuilds it"
        ) from None
    if len(ids) != summary.rows or (len(ids) and (ids[0] != summary.min_id or ids[-1] != summary.max_id)):
        raise ManifestError(f"shard {summary.name!r}: sidecar {layout.store.display(path)} does not match the catalog")
    return ids


def load_catalog(layout: Layout) -> Catalog:
    """The catalog, or an empty one when none was written yet (every shard is then summarised again)."""
    path = layout.store.url(FOLDER, CATALOG)
    try:
        table = pq.read_table(io.BytesIO(layout.store.read_bytes(path)))
    except FileNotFoundError:
        return Catalog()
    catalog = Catalog()
    cols = table.to_pydict()
    for name, rows, lo, hi, why in zip(cols["name"], cols["rows"], cols["min_id"], cols["max_id"], cols["refused"]):
        if why is None:
            catalog.summaries[name] = ShardSummary(name, rows, lo, hi)
        else:
            catalog.refused[name] = why
    return catalog


def save_catalog(layout: Layout, catalog: Catalog) -> None:
    """Commit the catalog atomically (one small file: ~20 bytes per shard)."""
    names = sorted(catalog.summaries) + sorted(catalog.refused)
    summaries = [catalog.summaries.get(n) for n in names]
    table = pa.table(
        {
            "name": pa.array(names, pa.string()),
            "rows": pa.array([s.rows if s else 0 for s in summaries], pa.int64()),
            "min_id": pa.array([s.min_id if s else -1 for s in summaries], pa.int64()),
            "max_id": pa.array([s.max_id if s else -1 for s in summaries], pa.int64()),
            "refused": pa.array([None if s else catalog.refused[n] for n, s in zip(names, summaries)], pa.string()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    layout.store.write_bytes(layout.store.url(FOLDER, CATALOG), buf.getvalue())


def first_common_id(a: np.ndarray, b: np.ndarray) -> int | None:
    """The smallest id in both sorted arrays, or None: O(len(a) log len(b)), no copy of either."""
    if not len(a) or not len(b):
        return None
    if len(a) > len(b):
        a, b = b, a
    pos = np.searchsorted(b, a)
    hit = a[(pos < len(b)) & (b[np.minimum(pos, len(b) - 1)] == a)]
    return int(hit[0]) if len(hit) else None
