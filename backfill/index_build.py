"""A partitioned IVF build: plan from size and a memory budget, train on a sample, add per shard, merge, tune nprobe."""

from __future__ import annotations

import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

import faiss
import numpy as np

from backfill.errors import ConfigError

ID_BYTES = 8  # IVF lists store an int64 id per vector


@dataclass(frozen=True)
class IndexPlan:
    """What to build for n vectors of a dimension within a memory budget, and why."""

    factory: str  # a faiss.index_factory string
    nlist: int  # 0: exact (Flat)
    bytes_per_vector: int  # code + id
    memory_bytes: int  # estimated size of the filled index
    train_size: int  # vectors to train on (0 for Flat)
    reason: str


def plan_index(
    n: int,
    dim: int,
    memory_budget: int,
    *,
    flat_below: int = 1_000,
    points_per_centroid: int = 64,
) -> IndexPlan:
    """Choose the index for n x dim vectors whose filled index must fit in memory_budget bytes.

    The most accurate encoding that fits wins: Flat (exact) for small n, then IVF with
    full vectors, 8-bit scalar codes, or product codes of dim/4, dim/8, dim/16 bytes.
    nlist is the power of two nearest 4*sqrt(n); the training sample is
    points_per_centroid x nlist (clamped to FAISS's useful 30..256 per centroid, and at least
    256 x 39 for PQ codebooks), never more than n.
    """
    if n < 1 or dim < 1:
        raise ConfigError(f"cannot plan an index for {n} vectors of dimension {dim}")
    if memory_budget < 1:
        raise ConfigError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    if not 30 <= points_per_centroid <= 256:
        raise ConfigError(f"points_per_centroid must be in 30..256, got {points_per_centroid}")
    flat_bytes = n * dim * 4
    if n < flat_below and flat_bytes <= memory_budget:
        return IndexPlan("Flat", 0, dim * 4, flat_bytes, 0, f"{n} < {flat_below} vectors: exact search")
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    while nlist > 1 and n < 39 * nlist:  # FAISS warns below 39 training points per centroid
        nlist //= 2
    centroids = nlist * dim * 4
    candidates: list[tuple[str, int, int]] = [(f"IVF{nlist},Flat", dim * 4, 0), (f"IVF{nlist},SQ8", dim, 0)]
    for div in (4, 8, 16):
        m = dim // div
        if m >= 1 and dim % m == 0:
            candidates.append((f"IVF{nlist},PQ{m}x8", m, 256 * dim * 4))  # + codebooks
    tried = []
    for factory, code, extra in candidates:
        memory = n * (code + ID_BYTES) + centroids + extra
        tried.append(f"{factory} {memory / 2**20:.0f} MiB")
        if memory <= memory_budget:
            train = min(n, max(30 * nlist, min(256 * nlist, points_per_centroid * nlist)))
            if "PQ" in factory:
                train = min(n, max(train, 256 * 39))
            why = f"n={n}: nlist={nlist} (4*sqrt(n)); most accurate encoding within {memory_budget / 2**20:.0f} MiB"
            return IndexPlan(factory, nlist, code + ID_BYTES, memory, train, why)
    raise ConfigError(
        f"no index for {n} vectors of dimension {dim} fits in a memory budget of {memory_budget / 2**20:.0f} MiB "
        f"(smallest: {tried[-1]}); raise the budget or shard the index"
    )


def train_empty(sample: np.ndarray, plan: IndexPlan, dim: int) -> bytes:
    """Train the planned index on a sample (float32, inner product); return it, empty, serialized."""
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.nlist:
        if len(sample) < plan.nlist:
            raise ConfigError(f"training sample of {len(sample)} vectors is smaller than nlist={plan.nlist}")
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()


def add_part(trained: bytes, ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """One shard's vectors added to a copy of the trained empty index (one partition of the build)."""
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    if len(ids) != len(vectors):
        raise ConfigError(f"add_part: {len(ids)} ids for {len(vectors)} vectors")
    if len(ids):
        if index.ntotal == 0 and not faiss.try_extract_index_ivf(index):
            index = faiss.IndexIDMap2(index)
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return faiss.serialize_index(index).tobytes()


def merge_parts(trained: bytes, parts: Iterable[bytes], ondisk: str | None = None) -> faiss.Index:
    """Merge shard indexes into one. In memory with IVF merge_from, or, with `ondisk` (a file
    path for the inverted lists), with faiss.contrib.ondisk.merge_ondisk: lists memory-mapped,
    for indexes larger than RAM. Ids are the ones given to add_part."""
    parts = list(parts)
    base = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    if not faiss.try_extract_index_ivf(base):  # Flat: concatenate
        merged = faiss.IndexIDMap2(base)
        for blob in parts:
            part = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
            if part.ntotal:
                merged.merge_from(part, 0)
        return merged
    if ondisk is None:
        for blob in parts:
            part = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
            base.merge_from(part, 0)  # moves the part's lists; ids kept as given
        return base
    from faiss.contrib.ondisk import merge_ondisk

    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i, blob in enumerate(parts):
            names.append(os.path.join(tmp, f"part-{i:05d}.faiss"))
            faiss.write_index(faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)), names[-1])
        merge_ondisk(base, names, ondisk)
    return base


@dataclass
class Tuning:
    nprobe: int
    recall: float
    recall_by_nprobe: dict[int, float] = field(default_factory=dict)
    k: int = 10


def exact_neighbours(parts: list[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top-k inner-product neighbours, part by part then merged (a brute-force reference)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_d = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for ids, vectors in parts:
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        d, pos = flat.search(queries, min(k, len(ids)))
        d = np.concatenate([best_d, d], axis=1)
        i = np.concatenate([best_i, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)], axis=1)
        top = np.argsort(-d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """recall@k: the share of the true top-k ids found in the first k answers."""
    k = truth.shape[1]
    return sum(len(set(f) & set(t) - {-1}) for f, t in zip(found[:, :k], truth)) / truth.size


def tune_nprobe(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, target: float = 0.95, exclude: np.ndarray | None = None
) -> Tuning:
    """The smallest power-of-two nprobe whose recall@k against `truth` reaches target (else nlist).

    `exclude`: per query, an id dropped from the answers (the query itself, when queries are
    drawn from the indexed vectors and `truth` was computed without them).
    """
    k = truth.shape[1]

    def answer() -> np.ndarray:
        if exclude is None:
            return index.search(queries, k)[1]
        return drop_self(index.search(queries, k + 1)[1], exclude, k)

    ivf = faiss.try_extract_index_ivf(index)
    if not ivf:
        return Tuning(0, recall(answer(), truth), {}, k)
    by: dict[int, float] = {}
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        by[nprobe] = recall(answer(), truth)
        if by[nprobe] >= target or nprobe >= ivf.nlist:
            return Tuning(nprobe, by[nprobe], by, k)
        nprobe = min(2 * nprobe, ivf.nlist)


def build_sharded(
    parts: list[tuple[np.ndarray, np.ndarray]],
    memory_budget: int,
    *,
    target_recall: float = 0.95,
    k: int = 10,
    n_queries: int = 200,
    workers: int = 2,
    seed: int = 0,
    ondisk: str | None = None,
) -> tuple[faiss.Index, IndexPlan, Tuning]:
    """The whole partitioned build in one process: plan, train on a sample, add the parts in
    parallel, merge, tune nprobe on held-in queries against exact search (each query's own id
    excluded from both answers). Each step is also callable alone, one partition per shard."""
    n = sum(len(ids) for ids, _ in parts)
    dim = parts[0][1].shape[1]
    plan = plan_index(n, dim, memory_budget)
    rng = np.random.default_rng(seed)
    sample = _sample(parts, plan.train_size or min(n, 1), rng)
    trained = train_empty(sample, plan, dim)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, threads // workers))  # parts in parallel, each on its share of cores
    try:
        with ThreadPoolExecutor(workers) as pool:  # faiss releases the GIL while adding
            blobs = list(pool.map(lambda p: add_part(trained, *p), parts))
    finally:
        faiss.omp_set_num_threads(threads)
    index = merge_parts(trained, blobs, ondisk)
    queries, qids = sample_queries(parts, n_queries, rng)
    truth = drop_self(exact_neighbours(parts, queries, k + 1), qids, k)
    return index, plan, tune_nprobe(index, queries, truth, target_recall, exclude=qids)


def _sample(parts: list[tuple[np.ndarray, np.ndarray]], size: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform sample across parts, drawn part by part (no concatenation of the whole corpus)."""
    sizes = np.array([len(ids) for ids, _ in parts])
    take = rng.multinomial(size, sizes / sizes.sum()) if sizes.sum() else sizes
    take = np.minimum(take, sizes)
    return np.concatenate([v[rng.choice(len(v), t, replace=False)] for (_, v), t in zip(parts, take) if t])


def sample_queries(parts, n_queries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, ids) of n_queries indexed vectors drawn uniformly across parts: recall is measured on them."""
    sizes = np.array([len(ids) for ids, _ in parts])
    pos = np.sort(rng.choice(int(sizes.sum()), min(n_queries, int(sizes.sum())), replace=False))
    which = np.searchsorted(np.cumsum(sizes), pos, side="right")
    offsets = pos - np.concatenate([[0], np.cumsum(sizes)[:-1]])[which]
    vectors = np.stack([parts[w][1][o] for w, o in zip(which, offsets)]).astype(np.float32)
    return vectors, np.array([parts[w][0][o] for w, o in zip(which, offsets)], dtype=np.int64)


def drop_self(found: np.ndarray, qids: np.ndarray, k: int) -> np.ndarray:
    """Each row of ids without its query's own id, cut to k (search for k + 1 first)."""
    return np.array([[i for i in row if i != q][:k] for row, q in zip(found, qids)]).reshape(len(found), k)
