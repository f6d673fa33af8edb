"""The budgeted index build: the plan rule, streamed ground truth, resumable parts, merge on disk, bounded blocks."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from backfill.config import IndexConfig
from backfill.errors import ConfigError, IncompleteError
from backfill.index import add_parts, build_index, finish_build, shard_groups, start_build
from backfill.index_build import merge_parts
from backfill.index_plan import block_rows, plan_index
from backfill.index_quality import exact_neighbours
from backfill.storage import Layout, Store
from bench.synthetic import clustered, write_embedded_shard

MODEL = "synthetic"


def plan(n: int, dim: int = 256, **config) -> str:
    return plan_index(n, dim, IndexConfig(**config)).factory


def test_plan_rule_at_its_boundaries():
    assert plan(999) == "Flat" and plan(1_000).startswith("IVF")  # flat_below
    assert plan(1_000_000) == "IVF4096,Flat"  # 4*sqrt(n) lists, full vectors fit 3/4 of 4 GiB
    big = {"max_nlist": 4096, "memory_budget_mb": 8192}
    assert plan(4_999_999, **big) == "IVF4096,Flat" and plan(5_000_000, **big) == "IVF4096,SQ8"  # pq_from
    # full vectors of 1M x 256 need ~1 GiB: a smaller budget compresses
    assert plan(1_000_000, memory_budget_mb=1318) == "IVF4096,Flat"  # 988 MiB <= 3/4 of 1318
    assert plan(1_000_000, memory_budget_mb=1317) == "IVF4096,SQ8"
    # the training sample takes at most 1/4 of the budget: fewer lists for small budgets
    assert plan(1_000_000, memory_budget_mb=200) == "IVF1024,PQ64x8np"
    assert plan(1_000_000, memory_budget_mb=40) == "IVF256,PQ16x8np"
    tight = plan_index(1_000_000, 256, IndexConfig(memory_budget_mb=10))
    assert tight.ondisk and tight.factory == "IVF64,PQ16x8np" and "lists on disk" in tight.reason
    assert not plan_index(1_000_000, 256, IndexConfig(memory_budget_mb=40)).ondisk
    assert plan(10_000_000) == "IVF16384,SQ8" and plan(10_000_000, max_nlist=4096) == "IVF4096,SQ8"
    assert plan(60, 16, flat_below=10, pq_from=11, pq_m=2) == "IVF1,PQ2x4np"  # pq_m forces PQ; 4-bit for few vectors
    with pytest.raises(ConfigError, match="pq_m=5 does not divide the embedding dimension 256"):
        plan(10_000_000, pq_m=5)


def test_plan_keeps_the_training_sample_and_blocks_within_the_budget():
    # held-out queries never train: 2,500 vectors minus 200 queries leave 2,300, enough for 32 lists (39 each), not 64
    assert plan_index(2_500, 16, IndexConfig()).nlist == 32
    p = plan_index(10_000_000, 256, IndexConfig(memory_budget_mb=256))
    assert p.train_size * 256 * 4 <= 256 * 2**20 // 4 and p.train_size >= 39 * p.nlist
    assert p.block_rows == block_rows(256, 256 * 2**20) and p.block_rows * 256 * 6 <= 256 * 2**20 // 8


def test_streamed_ground_truth_equals_brute_force():
    x = clustered(3_000, 24, 20, seed=3)
    queries = x[::97]
    sizes = [1, 700, 999, 1300]  # uneven blocks, one smaller than k
    blocks, at = [], 0
    for size in sizes:
        blocks.append((at, x[at : at + size]))
        at += size
    exact = faiss.IndexFlatIP(24)
    exact.add(x)
    assert np.array_equal(exact_neighbours(iter(blocks), queries, 10), exact.search(queries, 10)[1])


def test_merge_on_disk_answers_like_merge_in_memory(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    x = clustered(6_000, 32, 30)
    trained = faiss.index_factory(32, "IVF32,Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(x[::3])
    blob = faiss.serialize_index(trained)
    parts = []
    for s in range(0, len(x), 1500):
        part = faiss.deserialize_index(blob)
        part.add_with_ids(x[s : s + 1500], np.arange(s, s + 1500))
        parts.append(store.url("parts", f"{s}.faiss"))
        store.write_bytes(parts[-1], faiss.serialize_index(part).tobytes())
    in_memory = merge_parts(faiss.deserialize_index(blob), parts, store)
    on_disk = merge_parts(faiss.deserialize_index(blob), parts, store, ondisk=str(tmp_path / "lists.ivfdata"))
    for index in (in_memory, on_disk):
        faiss.extract_index_ivf(index).nprobe = 4
    assert on_disk.ntotal == in_memory.ntotal == len(x)
    found, expected = on_disk.search(x[:100], 10), in_memory.search(x[:100], 10)
    assert np.array_equal(found[1], expected[1]) and np.allclose(found[0], expected[0])


def synthetic_layout(tmp_path, n: int = 8_000, dim: int = 32, shards: int = 4, chunk_rows: int = 500) -> Layout:
    layout = Layout(Store.open(str(tmp_path / "root")))
    x = clustered(n, dim, 40, seed=5)
    ids = np.arange(n, dtype=np.int64) * 3 + 11  # image ids, not positions
    rejected = np.zeros(n, bool)
    rejected[::97] = True
    step = n // shards
    for i, s in enumerate(range(0, n, step)):
        write_embedded_shard(
            layout,
            MODEL,
            "v1",
            f"shard-{i:05d}",
            ids[s : s + step],
            x[s : s + step],
            chunk_rows,
            rejected[s : s + step],
        )
    return layout


SHARDS = [f"shard-{i:05d}" for i in range(4)]


def test_a_budgeted_build_reads_bounded_blocks_and_matches_the_in_memory_recall(tmp_path):
    layout = synthetic_layout(tmp_path, shards=2)
    roomy = build_index(layout, MODEL, "v1", SHARDS[:2], IndexConfig(train_points_per_centroid=39))
    # 3 MiB still holds this index and its training sample, but blocks of 2,048 vectors, not whole shards
    tight = build_index(layout, MODEL, "v1", SHARDS[:2], IndexConfig(train_points_per_centroid=39, memory_budget_mb=3))
    assert roomy.index_type == tight.index_type == "IVF128,Flat" and roomy.vectors == tight.vectors == 8_000 - 83
    rows = block_rows(32, 3 * 2**20)
    assert rows == 2_048 and tight.steps["largest_block"] == rows  # the most vectors any read handed out, counted
    assert roomy.steps["largest_block"] > rows  # one block per shard when the budget allows
    assert tight.recall_at_k == roomy.recall_at_k and tight.nprobe == roomy.nprobe and tight.passed


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_killed_part_is_rebuilt_and_valid_parts_are_not(tmp_path, monkeypatch):
    layout = synthetic_layout(tmp_path)
    reference = build_index(layout, MODEL, "v1", SHARDS, IndexConfig())
    real_write = type(layout.store).write_bytes
    parts_written = []

    def dying_write(self, path, data):
        if "/parts/" in path and path.endswith(".faiss"):
            if len(parts_written) == 2:
                raise Killed(path)  # the third part dies in its write: only a temporary file could be left
            parts_written.append(path)
        return real_write(self, path, data)

    monkeypatch.setattr(type(layout.store), "write_bytes", dying_write)
    with pytest.raises(Killed):
        build_index(layout, MODEL, "v1", SHARDS, IndexConfig())
    monkeypatch.setattr(type(layout.store), "write_bytes", real_write)
    # a part whose file does not match its marker (torn by another writer, bit rot) counts as missing
    layout.store.write_bytes(parts_written[1], b"torn")
    retry = build_index(layout, MODEL, "v1", SHARDS, IndexConfig())
    assert (retry.steps["parts_built"], retry.steps["parts_reused"]) == (3, 1)
    assert retry.recall_at_k == reference.recall_at_k and retry.vectors == reference.vectors
    assert not layout.store.ls(layout.store.url("indexes", MODEL, "work"))  # the work folder goes once the build exists


def test_an_index_larger_than_the_budget_is_merged_on_disk_and_searchable(tmp_path):
    layout = Layout(Store.open(str(tmp_path / "root")))
    x = clustered(80_000, 64, 40, seed=9)
    for i in range(2):
        rows = slice(i * 40_000, (i + 1) * 40_000)
        write_embedded_shard(layout, MODEL, "v1", SHARDS[i], np.arange(80_000)[rows], x[rows], 10_000)
    config = IndexConfig(memory_budget_mb=1, target_recall=0.5)  # 80,000 x 12 bytes of PQ4 codes > 3/4 MiB
    build = build_index(layout, MODEL, "v1", SHARDS[:2], config)
    assert (
        build.lists_file == "lists.ivfdata" and "lists on disk" in build.plan and build.index_type.endswith("PQ4x8np")
    )
    index = faiss.read_index(f"{build.path}/index.faiss")  # the lists are memory-mapped from beside it
    assert index.ntotal == 80_000 and build.index_bytes > 80_000 * 12
    faiss.extract_index_ivf(index).nprobe = build.nprobe
    _, found = index.search(x[:5], 2)
    assert set(found[:, 0]) <= set(range(80_000)) and build.recall_at_k > 0


def test_shard_groups_are_bounded_contiguous_and_cover_every_shard(tmp_path):
    layout = synthetic_layout(tmp_path, n=2_000, dim=8, shards=4, chunk_rows=250)
    work = start_build(layout, MODEL, "v1", SHARDS, IndexConfig())
    assert shard_groups(work, 2) == [SHARDS[:2], SHARDS[2:]]
    assert shard_groups(work, 4) == [[s] for s in SHARDS] == shard_groups(work, 100)  # never more than shards
    assert shard_groups(work, 1) == [SHARDS]
    # split by vectors, so 10,000 shards become at most add_parallelism steps; none is empty
    groups = shard_groups(work, 3)
    assert len(groups) == 3 and [s for g in groups for s in g] == SHARDS and all(groups)
    # and no group smaller than min_vectors (the synthetic shards have a few rejects: just under 2,000 vectors)
    assert (
        shard_groups(work, 4, min_vectors=2_001)
        == [SHARDS]
        == shard_groups(work, 4, min_vectors=IndexConfig().min_group_vectors)
    )
    assert shard_groups(work, 4, min_vectors=900) == [SHARDS[:2], SHARDS[2:]]


def test_the_stages_in_separate_calls_build_what_build_index_builds(tmp_path):
    layout = synthetic_layout(tmp_path)
    reference = build_index(layout, MODEL, "v1", SHARDS, IndexConfig())
    # add_parallelism does not name the work folder: a retry with another value finds the same parts
    work = start_build(layout, MODEL, "v1", SHARDS, IndexConfig(add_parallelism=2))
    assert work.folder == start_build(layout, MODEL, "v1", SHARDS, IndexConfig(add_parallelism=3)).folder
    added = [add_parts(layout, work, group) for group in shard_groups(work, 2)]
    with pytest.raises(IncompleteError, match="no valid part for shards"):
        _finish_without(layout, work, added, SHARDS[3])
    build = finish_build(layout, work, added + [add_parts(layout, work, SHARDS)])
    assert build.steps["parts_built"] == 5 and build.steps["parts_reused"] == 3  # the deleted part, rebuilt
    assert (build.vectors, build.recall_at_k, build.nprobe) == (
        reference.vectors,
        reference.recall_at_k,
        reference.nprobe,
    )


def _finish_without(layout: Layout, work, added, shard: str):
    layout.store.rm(work.part(shard) + ".json")  # its marker gone: the part does not count
    return finish_build(layout, work, added)


def test_exact_search_by_blas_leaves_faiss_settings_as_they_were():
    before = faiss.cvar.distance_compute_blas_threshold
    x = clustered(2_000, 16, 10, seed=4)
    found = exact_neighbours(iter([(0, x)]), x[:50], 5)
    exact = faiss.IndexFlatIP(16)
    exact.add(x)
    assert np.array_equal(found, exact.search(x[:50], 5)[1])
    assert faiss.cvar.distance_compute_blas_threshold == before
