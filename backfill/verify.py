"""Verify from storage alone that a shard's committed embeddings cover its manifest exactly once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backfill.embed import MARKER, read_chunks
from backfill.manifest import read_shard
from backfill.storage import Layout


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: int
    detail: str


def verify_shard(layout: Layout, model: str, version: str, shard: str) -> Verdict:
    out = layout.embeddings(model, version, shard)
    manifest = read_shard(layout, shard)
    table = read_chunks(layout, out, columns=["image_id"])
    ids = table.column("image_id").to_numpy() if table is not None else np.zeros(0, np.int64)
    if not layout.store.exists(f"{out}/{MARKER}"):
        return Verdict(False, len(ids), "no completion marker")
    missing = np.setdiff1d(manifest.image_ids, ids)
    extra = np.setdiff1d(ids, manifest.image_ids)
    duplicated = len(ids) - len(np.unique(ids))
    if len(missing) or len(extra) or duplicated:
        return Verdict(False, len(ids), f"{len(missing)} missing, {len(extra)} not in manifest, {duplicated} duplicated")
    return Verdict(True, len(ids), f"{len(ids)} rows, each manifest id exactly once")
