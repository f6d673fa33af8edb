import faiss
import numpy as np
import pytest

from backfill.config import EmbedConfig, IndexConfig
from backfill.embed import MARKER, embed_shard, is_chunk
from backfill.errors import IncompleteError
from backfill.index import BUILD_FILE, build_index, choose_index, latest_build, recall_at_k, train_index
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
    [(999, "Flat"), (1_000, "IVF16,Flat"), (2_400, "IVF32,Flat"), (100_000, "IVF1024,Flat"), (1_000_000, "IVF4096,Flat"), (10_000_000, "IVF16384,PQ64x8")],
)
def test_index_type_rule(n, factory):
    assert choose_index(n, 256, IndexConfig()).factory == factory


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


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_nprobe_is_the_smallest_that_meets_the_target():
    vectors = clustered(4000, 32, 50)
    trained = train_index(vectors, IndexConfig(target_recall=0.95))
    assert trained.spec.factory == "IVF64,Flat" and trained.index.ntotal == 4000
    tried = {int(k): v for k, v in trained.recall_by_nprobe.items()}
    assert trained.nprobe > 1 and tried[trained.nprobe] >= 0.95 and trained.recall == tried[trained.nprobe]
    assert all(v < 0.95 for p, v in tried.items() if p < trained.nprobe)
    # the measured recall is what a query really gets at that nprobe
    faiss.extract_index_ivf(trained.index).nprobe = trained.nprobe
    _, found = trained.index.search(vectors[:50], 11)
    exact = faiss.IndexFlatIP(32)
    exact.add(vectors)
    _, truth = exact.search(vectors[:50], 11)
    assert recall_at_k(found[:, 1:], truth[:, 1:], 10) >= 0.85


def test_training_never_uses_the_held_out_queries():
    # 2,500 vectors would get IVF256; with 200 held out only 2,300 may train, so nlist drops
    assert choose_index(2500, 16, IndexConfig()).nlist == 64
    assert choose_index(2500, 16, IndexConfig(), trainable=2300).nlist == 32


def test_build_index_ivf_from_storage(registered):
    layout, card = registered
    embed_all(layout, card)
    build = build_index(layout, MODEL, "v1", list_shards(layout), IndexConfig(flat_below=10, target_recall=0.9, n_queries=20))
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
