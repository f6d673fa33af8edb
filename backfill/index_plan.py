"""plan_index: the one rule that picks an index type from the vector count and a memory budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

from backfill.config import IndexConfig
from backfill.errors import ConfigError

ID_BYTES = 8  # IVF lists store an int64 id per vector
MiB = 2**20


@dataclass(frozen=True)
class IndexPlan:
    """What to build for n vectors of a dimension within a memory budget, and why."""

    factory: str  # a faiss.index_factory string
    nlist: int  # 0: exact (Flat)
    memory_bytes: int  # estimated size of the filled index
    train_size: int  # vectors the quantizer trains on (0 for Flat)
    n_queries: int  # held-out vectors recall is measured on (never trained on)
    block_rows: int  # most vectors any step reads at once
    ondisk: bool  # the filled index exceeds its share of the budget: inverted lists merged on disk
    reason: str

    @property
    def is_ivf(self) -> bool:
        return self.nlist > 0


def index_share(budget: int) -> int:
    """Of a step's budget, what the filled index may take: the rest is the process, one block, search buffers."""
    return budget * 3 // 4


def block_rows(dim: int, budget: int) -> int:
    """Vectors per streamed block: an eighth of the budget, counting the fp16 read and its float32 copy."""
    return max(1, budget // 8 // (dim * 6))


def plan_index(n: int, dim: int, config: IndexConfig) -> IndexPlan:
    """Choose the index for n x dim vectors (inner product) within config.memory_budget_mb.

    The rule, most accurate first:
      n < flat_below                         -> Flat (exact)
      else IVF{nlist}, with codes, the first that fits 3/4 of the budget:
        Flat (full vectors; only while n < pq_from), SQ8 (dim bytes), PQ{dim/4}, PQ{dim/8}, PQ{dim/16}
        (pq_m > 0 forces PQ{pq_m} whenever codes are compressed; 4-bit PQ below 9,984 training vectors)
      nothing fits                           -> the smallest PQ, its inverted lists merged on disk
    nlist is the power of two nearest 4*sqrt(n), at most max_nlist, lowered until every centroid
    gets 39 training vectors (FAISS's floor) from the trainable vectors and the sample fits a quarter
    of the budget. The held-out queries are never trained on.
    """
    if n < 1 or dim < 1:
        raise ConfigError(f"cannot plan an index for {n} vectors of dimension {dim}: embed some shards first")
    budget = config.memory_budget_mb * MiB
    n_queries = min(config.n_queries, max(1, n // 10))
    rows = block_rows(dim, budget)
    if n < config.flat_below:
        memory = n * dim * 4
        why = f"{n} < flat_below={config.flat_below} vectors: exact search"
        return IndexPlan("Flat", 0, memory, 0, n_queries, rows, memory > index_share(budget), why)
    trainable = n - n_queries
    max_sample = max(1, budget // 4 // (dim * 4))
    nlist = min(config.max_nlist, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    while nlist > 1 and min(trainable, max_sample) < 39 * nlist:
        nlist //= 2
    train = min(trainable, max_sample, config.train_points_per_centroid * nlist)
    tried = []
    for codes, code_bytes in _encodings(n, dim, config):
        if codes.startswith("PQ") and "x8" in codes:
            train = min(trainable, max_sample, max(train, 39 * 256))  # 8-bit codebooks: 256 centroids each
        memory = n * (code_bytes + ID_BYTES) + nlist * dim * 4
        tried.append(f"{codes} {memory / MiB:.0f} MiB")
        if memory <= index_share(budget):
            why = f"n={n}: nlist={nlist}, {codes}: the most accurate codes within 3/4 of {config.memory_budget_mb} MiB"
            return IndexPlan(f"IVF{nlist},{codes}", nlist, memory, train, n_queries, rows, False, why)
    why = f"n={n}: no encoding fits 3/4 of {config.memory_budget_mb} MiB ({', '.join(tried)}): lists on disk"
    return IndexPlan(f"IVF{nlist},{codes}", nlist, memory, train, n_queries, rows, True, why)


def _encodings(n: int, dim: int, config: IndexConfig) -> list[tuple[str, int]]:
    """(faiss codes, bytes per vector), most accurate first."""
    bits = 8 if n >= 39 * 256 else 4  # 8-bit codebooks need 256 centroids per sub-quantizer
    if config.pq_m:
        pq = [config.pq_m] if dim % config.pq_m == 0 else []
        if not pq:
            raise ConfigError(f"pq_m={config.pq_m} does not divide the embedding dimension {dim}: pick a divisor")
    else:
        pq = [dim // div for div in (4, 8, 16) if dim // div >= 1 and dim % (dim // div) == 0]
    # "np": no polysemous training (a slow codebook reordering only Hamming-filtered search uses)
    compressed = [(f"PQ{m}x{bits}np", math.ceil(m * bits / 8)) for m in dict.fromkeys(pq)]
    if not config.pq_m:
        compressed.insert(0, ("SQ8", dim))
    return ([("Flat", dim * 4)] if n < config.pq_from else []) + compressed
