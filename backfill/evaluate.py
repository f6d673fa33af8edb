"""Near-duplicate recall: does a query image find the other members of its group?"""

from __future__ import annotations

import io

import faiss
import numpy as np
import pyarrow.parquet as pq

from backfill.embed import load_embeddings
from backfill.storage import Layout


def near_duplicate_recall(layout: Layout, model: str, version: str, shards: list[str], k: int = 10) -> dict[str, float]:
    """Exact-search recall@k of group members, over every image whose group has >= 2 members.

    Needs the manifest's group_id column (the sample corpus has it). For a query in a
    group of size g, recall is the share of its g-1 partners found in its top k
    (itself excluded).
    """
    ids_all, vecs_all, groups_all = [], [], []
    for shard in shards:
        ids, vectors, valid = load_embeddings(layout, model, version, shard)
        table = pq.read_table(
            io.BytesIO(layout.store.read_bytes(layout.manifest(shard))), columns=["image_id", "group_id"]
        )
        group_of = dict(zip(table.column("image_id").to_pylist(), table.column("group_id").to_pylist()))
        ids_all.append(ids[valid])
        vecs_all.append(vectors[valid])
        groups_all.append(np.array([group_of[i] for i in ids[valid].tolist()], dtype=np.int64))
    ids, vectors, groups = np.concatenate(ids_all), np.concatenate(vecs_all), np.concatenate(groups_all)
    sizes = {g: c for g, c in zip(*np.unique(groups, return_counts=True))}
    queries = np.flatnonzero([sizes[g] > 1 for g in groups])
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    _, found = index.search(vectors[queries], k + 1)
    recalls, top1 = [], []
    for q, row in zip(queries, found):
        partners = [p for p in row if p != q and p >= 0][:k]
        same = [groups[p] == groups[q] for p in partners]
        recalls.append(sum(same) / min(k, sizes[groups[q]] - 1))
        top1.append(bool(same and same[0]))
    return {"queries": float(len(queries)), f"recall_at_{k}": float(np.mean(recalls)), "top1": float(np.mean(top1))}
