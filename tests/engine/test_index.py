import faiss
import numpy as np
import pytest

from backfill.config import EmbedConfig, IndexConfig
from backfill.embed import MARKER, embed_shard
from backfill.errors import IncompleteError
from backfill.index import BUILD_FILE, build_index, choose_index, latest_build, recall_at_k
from backfill.manifest import list_shards
from backfill.registry import load_model
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


def test_ivf_nprobe_is_tuned_to_the_target(registered):
    layout, card = registered
    embed_all(layout, card)
    config = IndexConfig(flat_below=10, target_recall=0.9, n_queries=20)
    build = build_index(layout, MODEL, "v1", list_shards(layout), config)
    assert build.index_type.startswith("IVF") and build.nlist >= 1
    assert build.recall_at_k >= 0.9 and build.passed
    # nprobe is the smallest power of two (or nlist) that met the target
    tried = {int(k): v for k, v in build.recall_by_nprobe.items()}
    assert tried[build.nprobe] >= 0.9
    assert all(v < 0.9 for k, v in tried.items() if k < build.nprobe)
    index = faiss.read_index(f"{build.path}/index.faiss")
    assert index.ntotal == 60


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
    first_chunk = [n for n in layout.store.ls(out) if n.endswith(".parquet")][0]
    layout.store.rm(f"{out}/{first_chunk}")
    with pytest.raises(IncompleteError, match=r"shard-00001: 12 committed rows for 20 manifest ids \(8 missing"):
        build_index(layout, MODEL, "v1", list_shards(layout), IndexConfig())
