"""Index quality: exact ground truth streamed block by block, recall@k, and the one nprobe tuner."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import faiss
import numpy as np

# (queries, block, k) -> (scores, positions within the block): swap in a GPU kNN without touching the heap
Knn = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@contextlib.contextmanager
def blas_distances() -> Iterator[None]:
    """FAISS by BLAS from 20 queries on (its default before 1.15), inside the block only.

    FAISS 1.15 computes distances by BLAS only from distance_compute_blas_threshold (128,000) queries; its
    direct kernel took 13x longer for 200 queries against 100,000 vectors (k=11) and 1.3x longer to assign
    20,000 vectors to 4,096 centroids on one AVX2 core, with the same neighbours."""
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = min(saved, 20)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


def _cpu_knn(queries: np.ndarray, block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    with blas_distances():
        return faiss.knn(queries, block, k, metric=faiss.METRIC_INNER_PRODUCT)


def exact_search(
    blocks: Iterable[tuple[int, np.ndarray]], queries: np.ndarray, k: int, knn: Knn = _cpu_knn
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the exact top-k inner-product neighbours of each query over (first position,
    vectors) blocks, merged into one result heap: one block is held at a time, never a copy of all vectors.
    Rows with fewer than k vectors seen are padded with position -1."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for first, block in blocks:
        if not len(block):
            continue
        scores, found = knn(queries, np.ascontiguousarray(block, dtype=np.float32), min(k, len(block)))
        heap.add_result(scores, np.where(found >= 0, found + first, -1))
    heap.finalize()
    return heap.D, heap.I


def exact_neighbours(
    blocks: Iterable[tuple[int, np.ndarray]], queries: np.ndarray, k: int, knn: Knn = _cpu_knn
) -> np.ndarray:
    """Positions of the exact top-k neighbours of each query, streamed over the blocks (see exact_search)."""
    return exact_search(blocks, queries, k, knn)[1]


def merge_results(results: Iterable[tuple[np.ndarray, np.ndarray]], n_queries: int, k: int) -> np.ndarray:
    """Positions of the top-k over partial (scores, positions) results, such as one exact_search per shard."""
    heap = faiss.ResultHeap(n_queries, k, keep_max=True)
    for scores, found in results:
        heap.add_result(scores, found)
    heap.finalize()
    return heap.I


def drop_self(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row without its query's own position, cut to k (search for k + 1 first)."""
    return np.array([[p for p in row if p != q][:k] for row, q in zip(found, own)], dtype=np.int64).reshape(
        len(found), k
    )


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """The share of the true top-k found in the first k answers (-1, FAISS's 'no result', never counts)."""
    hits = sum(len(set(f[:k]) & set(t[:k]) - {-1}) for f, t in zip(found, truth))
    return hits / (len(truth) * k)


@dataclass
class Tuning:
    nprobe: int  # 0 for an exact (Flat) index
    recall: float
    recall_by_nprobe: dict[str, float] = field(default_factory=dict)


def tune_nprobe(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, target: float, own: np.ndarray, start: int = 1
) -> Tuning:
    """The smallest power-of-two nprobe from `start` whose recall@k against `truth` reaches target (else nlist).

    Queries are indexed vectors: `own` holds each query's position, dropped from the answers as it
    was from `truth`. The index is left at the chosen nprobe.
    """
    k = truth.shape[1]
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def measured() -> float:
        return recall_at_k(drop_self(index.search(queries, k + 1)[1], own, k), truth, k)

    ivf = faiss.try_extract_index_ivf(index)
    if not ivf:
        return Tuning(0, measured())
    by: dict[str, float] = {}
    nprobe = min(max(1, start), ivf.nlist)
    while True:
        ivf.nprobe = nprobe
        by[str(nprobe)] = measured()
        if by[str(nprobe)] >= target or nprobe >= ivf.nlist:
            return Tuning(nprobe, by[str(nprobe)], by)
        nprobe = min(2 * nprobe, ivf.nlist)
