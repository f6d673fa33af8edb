"""Synthetic embeddings in the engine's on-storage format (manifest shard, chunks, marker), for tests and benches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from backfill.finalise import MARKER
from backfill.manifest import write_shard
from backfill.storage import Layout
from backfill.writer import chunk_plan, write_chunk


def clustered(
    n: int,
    dim: int,
    clusters: int,
    seed: int = 0,
    spread: float = 0.5,
    intrinsic: int = 0,
    centre_seed: int | None = None,
) -> np.ndarray:
    """Unit vectors around `clusters` random centres (a gaussian mixture, so recall is meaningful).

    intrinsic > 0: the spread lies in a random subspace of that dimension (real embeddings sit near a
    low-dimensional manifold; isotropic noise makes near neighbours all but equidistant). Points with the
    same centre_seed share their centres, so a corpus can be drawn shard by shard with different seeds."""
    centres_rng = np.random.default_rng(seed if centre_seed is None else centre_seed)
    centres = centres_rng.standard_normal((clusters, dim)).astype(np.float32)
    basis = centres_rng.standard_normal((intrinsic, dim)).astype(np.float32) if intrinsic else None
    rng = np.random.default_rng(seed)
    if basis is None:
        noise = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        noise = rng.standard_normal((n, intrinsic), dtype=np.float32) @ basis
    x = centres[rng.integers(0, clusters, n)] + spread * noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embedded_shard(
    layout: Layout,
    model: str,
    version: str,
    shard: str,
    ids: np.ndarray,
    vectors: np.ndarray,
    chunk_rows: int,
    rejected: np.ndarray | None = None,
) -> None:
    """A manifest shard of `ids` and its embeddings as embed_shard commits them: chunks of chunk_rows rows
    (fp16, rejected rows null with a reason), then the completion marker."""
    rejected = np.zeros(len(ids), bool) if rejected is None else rejected
    uris = [f"synthetic://{shard}/{i}" for i in ids]
    write_shard(layout, shard, pa.table({"image_id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string())}))
    out = layout.embeddings(model, version, shard)
    for start, end in chunk_plan(len(ids), chunk_rows):
        bad = rejected[start:end]
        errors = ["synthetic reject" if b else None for b in bad]
        write_chunk(layout, out, start, end, ids[start:end], vectors[start:end], ~bad, errors)
    marker = {
        "images": len(ids),
        "rejects": int(rejected.sum()),
        "embedded": int((~rejected).sum()),
        "chunk_size": chunk_rows,
    }
    layout.store.write_json(f"{out}/{MARKER}", marker)
