"""The partitioned index build: planning under a memory budget, add per shard + merge equals one add, recall."""

from __future__ import annotations

import numpy as np
import pytest

import faiss
from backfill.errors import ConfigError
from backfill.index_build import add_part, build_sharded, exact_neighbours, merge_parts, plan_index, recall, train_empty

MiB = 2**20


def clustered(n: int, dim: int, clusters: int = 50, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_plan_follows_size_and_memory_budget():
    assert plan_index(500, 64, 1 * MiB).factory == "Flat"
    n, dim = 1_000_000, 256
    roomy = plan_index(n, dim, 4096 * MiB)
    assert roomy.factory == "IVF4096,Flat" and roomy.train_size == 64 * 4096
    assert plan_index(n, dim, 300 * MiB).factory == "IVF4096,SQ8"  # full vectors need ~1 GiB
    tight = plan_index(n, dim, 100 * MiB)
    assert tight.factory == "IVF4096,PQ64x8" and tight.memory_bytes <= 100 * MiB
    assert plan_index(n, dim, 40 * MiB).factory == "IVF4096,PQ16x8"
    with pytest.raises(ConfigError, match=r"no index for 1000000 vectors of dimension 256 fits in a memory budget of 10 MiB"):
        plan_index(n, dim, 10 * MiB)
    small = plan_index(5_000, 32, 64 * MiB)
    assert small.nlist * 39 <= 5_000 and small.train_size <= 5_000


def test_add_per_shard_then_merge_answers_like_one_index(tmp_path):
    x = clustered(8_000, 32)
    ids = np.arange(10**6, 10**6 + len(x))  # image ids, not positions
    plan = plan_index(len(x), 32, 64 * MiB, points_per_centroid=39)
    trained = train_empty(x[::2], plan, 32)
    parts = [add_part(trained, ids[s : s + 2000], x[s : s + 2000]) for s in range(0, len(x), 2000)]
    merged = merge_parts(trained, parts)
    ondisk = merge_parts(trained, parts, ondisk=str(tmp_path / "lists.ivfdata"))
    reference = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    reference.add_with_ids(x, ids)
    queries = x[:100]
    for index in (merged, ondisk, reference):
        faiss.extract_index_ivf(index).nprobe = 8
    expected = reference.search(queries, 10)
    for index in (merged, ondisk):
        assert index.ntotal == len(x)
        found = index.search(queries, 10)
        assert np.array_equal(found[1], expected[1]) and np.allclose(found[0], expected[0])


def test_build_sharded_reaches_target_recall_against_exact_search():
    x = clustered(12_000, 32, seed=1)
    ids = np.arange(len(x)) * 7 + 3
    parts = [(ids[s : s + 3000], x[s : s + 3000]) for s in range(0, len(x), 3000)]
    index, plan, tuning = build_sharded(parts, 64 * MiB, target_recall=0.95, n_queries=100, workers=2)
    assert plan.factory.startswith("IVF") and index.ntotal == len(x)
    assert tuning.recall >= 0.95 and tuning.nprobe in tuning.recall_by_nprobe
    # the reported recall is real: recompute it against exact search at the tuned nprobe
    queries = x[5:105]
    truth = exact_neighbours(parts, queries, 10)
    faiss.extract_index_ivf(index).nprobe = tuning.nprobe
    assert recall(index.search(queries, 10)[1], truth) >= 0.9
    assert set(index.search(queries[:3], 1)[1].ravel()) <= set(ids.tolist())


def test_flat_plan_merges_too():
    x = clustered(600, 16)
    ids = np.arange(len(x)) + 50
    index, plan, tuning = build_sharded([(ids[:300], x[:300]), (ids[300:], x[300:])], MiB, n_queries=50)
    assert plan.factory == "Flat" and index.ntotal == 600 and tuning.recall == 1.0
