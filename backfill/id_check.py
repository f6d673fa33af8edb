"""The pre-publish guarantee: no image_id in two shards, checked over the sorted sidecars in bounded memory."""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from backfill.errors import ManifestError
from backfill.shard_summary import ShardSummary, load_catalog, read_ids, summarise
from backfill.storage import Layout

MAX_IDS_IN_MEMORY = 16_000_000  # ~128 MB of int64 per bucket; a group above it is spilled to local disk
_HASH = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads any id pattern evenly over the buckets


def overlapping_groups(summaries: list[ShardSummary]) -> list[list[ShardSummary]]:
    """Shards chained by overlapping [min, max] id ranges; two shards in different groups share no id."""
    groups: list[list[ShardSummary]] = []
    reach = -1
    for s in sorted((s for s in summaries if s.rows), key=lambda s: s.min_id):
        if groups and s.min_id <= reach:
            groups[-1].append(s)
            reach = max(reach, s.max_id)
        else:
            groups.append([s])
            reach = s.max_id
    return groups


def check_unique(layout: Layout, shards: list[str], max_ids_in_memory: int = MAX_IDS_IN_MEMORY) -> None:
    """Raise ManifestError naming an image_id found in two of `shards` (and both shards).

    Shards with disjoint id ranges are never read: range-partitioned ids cost one catalog read.
    Overlapping shards are read one sidecar at a time; a group larger than max_ids_in_memory is
    hash-partitioned into buckets on local disk first, so memory stays bounded at any corpus size.
    """
    catalog = load_catalog(layout)
    # a shard the registry sensor has not summarised yet (or whose catalog was lost) is summarised here
    summaries = [catalog.summaries.get(n) or summarise(layout, n)[0] for n in shards]
    for group in overlapping_groups(summaries):
        if len(group) > 1:
            dup = _duplicate_in(layout, group, max_ids_in_memory)
            if dup is not None:
                owners = [s.name for s in group if _holds(layout, s, dup)]
                raise ManifestError(
                    f"image_id {dup} appears in manifest shards {owners[0]!r} and {owners[1]!r}: "
                    "every image_id must appear in exactly one shard; remove it from one of them (as a new shard name)"
                )


def _duplicate_in(layout: Layout, group: list[ShardSummary], max_ids: int) -> int | None:
    total = sum(s.rows for s in group)
    if total <= max_ids:
        return _first_repeat(np.concatenate([read_ids(layout, s) for s in group]))
    bits = max(1, int(np.ceil(np.log2(2 * total / max_ids))))
    with tempfile.TemporaryDirectory(prefix="id-check-") as tmp:
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(os.path.join(tmp, f"{b}.bin"), "wb")) for b in range(1 << bits)]
            for s in group:  # one sidecar in memory at a time, its ids appended to their buckets
                ids = read_ids(layout, s)
                bucket = (ids.astype(np.uint64) * _HASH) >> np.uint64(64 - bits)
                order = np.argsort(bucket, kind="stable")
                bounds = np.searchsorted(bucket[order], np.arange((1 << bits) + 1, dtype=np.uint64))
                for b, f in enumerate(files):
                    f.write(ids[order[bounds[b] : bounds[b + 1]]].tobytes())
        for b in range(1 << bits):
            dup = _first_repeat(np.fromfile(os.path.join(tmp, f"{b}.bin"), dtype=np.int64))
            if dup is not None:
                return dup
    return None


def _first_repeat(ids: np.ndarray) -> int | None:
    ids = np.sort(ids)
    same = np.flatnonzero(ids[1:] == ids[:-1])
    return int(ids[same[0]]) if len(same) else None


def _holds(layout: Layout, s: ShardSummary, image_id: int) -> bool:
    if not s.min_id <= image_id <= s.max_id:
        return False
    ids = read_ids(layout, s)
    pos = int(np.searchsorted(ids, image_id))
    return pos < len(ids) and int(ids[pos]) == image_id
