import faiss
import numpy as np
import pytest

from backfill.config import EmbedConfig, IndexConfig
from backfill.embed import MARKER, embed_shard, is_chunk
from backfill.errors import IncompleteError
from backfill.index import BUILD_FILE, build_index, latest_build, read_build
from backfill.index_build import sample_positions
from backfill.index_plan import plan_index
from backfill.index_quality import exact_neighbours, recall_at_k, tune_nprobe
from backfill.manifest import list_shards
from backfill.runtime import load_model
from tests.conftest import MODEL

CONFIG = EmbedConfig(batch_size=8, chunk_size=8, torch_threads=1)


def embed_all(layout, card):
    model = load_model(layout, card)
    for shard in list_shards(layout):
        embed_shard(layout, shard, model, CONFIG)


@pytest.mark.parametrize(
    "n, factory",
    [
        (999, "Flat"),
        (1_000, "IVF16,Flat"),
        (2_400, "IVF32,Flat"),
        (100_000, "IVF1024,Flat"),
        (1_000_000, "IVF4096,Flat"),
        (10_000_000, "IVF16384,SQ8"),
    ],
)
def test_index_type_rule(n, factory):
    assert plan_index(n, 256, IndexConfig()).factory == factory


def test_recall_at_k_counts_overlap():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), truth, 3) == 1.0
    assert recall_at_k(np.array([[3, 9, 9], [-1, -1, 4]]), truth, 3) == pytest.approx(2 / 6)


def test_build_index_flat_is_exact(registered):
    layout, card = registered
    embed_all(layout, card)
    build = build_index(layout, MODEL, "v1", list_shards(layout), IndexConfig(), model_created=card.created)
    assert build.index_type == "Flat" and build.vectors == 60 and build.recall_at_k == 1.0 and build.passed
    assert layout.store.exists(f"{build.path}/{BUILD_FILE}")
    assert latest_build(layout, MODEL, "v1").build_id == build.build_id
    assert build.memory_budget_mb == 4096 and "exact search" in build.plan
    assert {"scan_s", "train_s", "add_s", "merge_s", "ground_truth_s", "tune_s"} <= set(build.steps)


def test_builds_written_before_the_budgeted_build_still_read(registered):
    layout, card = registered
    embed_all(layout, card)
    build = build_index(layout, MODEL, "v1", list_shards(layout), IndexConfig())
    record = layout.store.read_json(f"{build.path}/{BUILD_FILE}")
    for key in ("plan", "memory_budget_mb", "steps", "lists_file"):
        del record[key]  # as written before
    layout.store.write_json(f"{build.path}/{BUILD_FILE}", record)
    old = read_build(layout, MODEL, build.build_id)
    assert old.vectors == 60 and old.steps == {} and old.lists_file == ""


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_nprobe_is_the_smallest_that_meets_the_target():
    vectors = clustered(4000, 32, 50)
    index = faiss.index_factory(32, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[200:])
    index.add(vectors)
    own = np.arange(0, 4000, 20)
    truth = exact_neighbours(iter([(0, vectors)]), vectors[own], 11)
    truth = np.array([[p for p in row if p != q][:10] for row, q in zip(truth, own)])
    tuning = tune_nprobe(index, vectors[own], truth, 0.95, own)
    tried = {int(k): v for k, v in tuning.recall_by_nprobe.items()}
    assert tuning.nprobe > 1 and tried[tuning.nprobe] >= 0.95 and tuning.recall == tried[tuning.nprobe]
    assert all(v < 0.95 for p, v in tried.items() if p < tuning.nprobe)
    assert faiss.extract_index_ivf(index).nprobe == tuning.nprobe  # left where it was chosen
    # the measured recall is what a query really gets at that nprobe
    _, found = index.search(vectors[:50], 11)
    exact = faiss.IndexFlatIP(32)
    exact.add(vectors)
    _, reference = exact.search(vectors[:50], 11)
    assert recall_at_k(found[:, 1:], reference[:, 1:], 10) >= 0.85


def test_training_never_uses_the_held_out_queries():
    # 2,500 vectors would get IVF64 from 4*sqrt(n) and 39 per list; 200 held out leave 2,300: IVF32
    assert plan_index(2500, 16, IndexConfig(n_queries=1)).nlist == 64
    plan = plan_index(2500, 16, IndexConfig())
    assert plan.nlist == 32 and plan.n_queries == 200
    queries, training = sample_positions(2500, plan, seed=1234)
    assert len(queries) == 200 and len(training) == plan.train_size and not set(queries) & set(training)
    assert np.array_equal(queries, sample_positions(2500, plan, seed=1234)[0])  # deterministic


def test_build_index_ivf_from_storage(registered):
    layout, card = registered
    embed_all(layout, card)
    build = build_index(
        layout, MODEL, "v1", list_shards(layout), IndexConfig(flat_below=10, target_recall=0.9, n_queries=20)
    )
    assert build.index_type.startswith("IVF") and build.passed
    assert faiss.read_index(f"{build.path}/index.faiss").ntotal == 60


def test_unreachable_target_builds_but_does_not_pass(registered):
    layout, card = registered
    embed_all(layout, card)
    config = IndexConfig(flat_below=10, pq_from=11, pq_m=2, target_recall=1.0, n_queries=20)
    build = build_index(layout, MODEL, "v1", list_shards(layout), config)
    assert "PQ" in build.index_type and build.recall_at_k < 1.0 and not build.passed


def test_missing_shard_marker_is_reported(registered):
    layout, card = registered
    embed_all(layout, card)
    layout.store.rm(f"{layout.embeddings(MODEL, 'v1', 'shard-00002')}/{MARKER}")
    with pytest.raises(IncompleteError, match="shard shard-00002 has no completion marker"):
        build_index(layout, MODEL, "v1", list_shards(layout), IndexConfig())


def test_missing_chunk_is_reported_as_missing_rows(registered):
    layout, card = registered
    embed_all(layout, card)
    out = layout.embeddings(MODEL, "v1", "shard-00001")
    first_chunk = [n for n in layout.store.ls(out) if is_chunk(n)][0]
    layout.store.rm(f"{out}/{first_chunk}")
    with pytest.raises(IncompleteError, match=r"shard-00001: 12 committed rows for 20 manifest ids \(8 missing"):
        build_index(layout, MODEL, "v1", list_shards(layout), IndexConfig())
