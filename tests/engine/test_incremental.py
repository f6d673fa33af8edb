"""Near-line updates: a new shard is added to the latest build (no retraining), checked, and published."""

import io

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backfill import id_check, incremental, index_build
from backfill.config import EmbedConfig, IndexConfig
from backfill.embed import embed_shard, load_embeddings
from backfill.errors import IncompleteError, ManifestError
from backfill.incremental import build_or_update
from backfill.index import IDS_FILE, INDEX_FILE, build_index, latest_build
from backfill.index_quality import recall_at_k
from backfill.manifest import list_shards, read_shard, write_shard
from backfill.publish import publish
from backfill.runtime import load_model
from backfill.search import Searcher
from tests.conftest import MODEL, make_layout, register_tiny

CONFIG = EmbedConfig(batch_size=16, chunk_size=16, torch_threads=1)


def embed(layout, card, shards):
    model = load_model(layout, card)
    for shard in shards:
        embed_shard(layout, shard, model, CONFIG)


def ids_of(layout, build):
    return pq.read_table(io.BytesIO(layout.store.read_bytes(f"{build.path}/{IDS_FILE}"))).column("image_id").to_numpy()


def test_a_new_shard_is_added_to_the_published_build_and_found(registered):
    layout, card = registered
    s0, s1, s2 = list_shards(layout)
    embed(layout, card, [s0, s1])
    base = build_or_update(layout, MODEL, "v1", [s0, s1], IndexConfig(), model_created=card.created)
    assert base.mode == "full" and base.build.shard_names == [s0, s1]
    publish(layout, MODEL, base.build.build_id)
    base_blob = layout.store.read_bytes(f"{base.build.path}/{INDEX_FILE}")

    embed(layout, card, [s2])
    out = build_or_update(layout, MODEL, "v1", [s0, s1, s2], IndexConfig(), model_created=card.created)
    assert (out.mode, out.base_build_id, out.added_shards) == ("incremental", base.build.build_id, (s2,))
    build = out.build
    assert build.vectors == 60 and build.shards == 3 and build.shard_names == [s0, s1, s2] and build.passed
    assert build.index_type == "Flat" and build.model_created == card.created
    expected = np.concatenate([read_shard(layout, s).image_ids for s in (s0, s1, s2)])
    assert np.array_equal(ids_of(layout, build), expected)  # the base's rows first, then the new shard's
    assert layout.store.read_bytes(f"{base.build.path}/{INDEX_FILE}") == base_blob  # builds are immutable

    searcher = Searcher(layout, MODEL)
    new_id, uri = int(read_shard(layout, s2).image_ids[4]), read_shard(layout, s2).uris[4]
    with open(uri, "rb") as f:
        data = f.read()
    assert searcher.search_image(data, k=3).hits[0].image_id != new_id  # not searchable before the update
    assert publish(layout, MODEL, build.build_id).published
    answer = searcher.search_image(data, k=3)
    assert answer.build_id == build.build_id and answer.hits[0].image_id == new_id


def test_ivf_update_keeps_the_trained_quantizer_and_meets_recall_against_exact(tmp_path):
    layout = make_layout(tmp_path / "root", images=340, shards=4)
    card = register_tiny(layout, "v1")
    shards = list_shards(layout)
    embed(layout, card, shards)
    config = IndexConfig(flat_below=100, target_recall=0.95)
    base = build_or_update(layout, MODEL, "v1", shards[:3], config).build
    assert base.index_type == "IVF4,Flat"
    out = build_or_update(layout, MODEL, "v1", shards, config)
    assert out.mode == "incremental" and out.build.index_type == "IVF4,Flat" and out.build.vectors == 340

    def load(build):
        index = faiss.deserialize_index(
            np.frombuffer(layout.store.read_bytes(f"{build.path}/{INDEX_FILE}"), dtype=np.uint8)
        )
        return index, faiss.extract_index_ivf(index)

    (_, base_ivf), (index, ivf) = load(base), load(out.build)

    def centroids(q: faiss.Index) -> np.ndarray:
        return faiss.rev_swig_ptr(faiss.downcast_index(q).get_xb(), q.ntotal * q.d).copy()

    assert np.array_equal(centroids(base_ivf.quantizer), centroids(ivf.quantizer))  # not retrained

    # independent reference: exact search over every vector of the version, at the build's nprobe
    loaded = [load_embeddings(layout, MODEL, "v1", s) for s in shards]
    vectors = np.concatenate([v[ok] for _, v, ok in loaded])
    ids = np.concatenate([i[ok] for i, _, ok in loaded])
    assert np.array_equal(ids, ids_of(layout, out.build))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    queries = vectors[-85:]  # the new shard's images
    ivf.nprobe = out.build.nprobe
    _, found = index.search(queries, 10)
    _, truth = exact.search(queries, 10)
    assert recall_at_k(found, truth, 10) >= 0.95 - 0.05  # the gate samples 85 of these; allow sampling noise
    assert out.build.recall_at_k >= 0.95 and out.build.passed


def test_full_build_when_the_index_would_change_type_or_nothing_is_new(tmp_path, monkeypatch):
    layout = make_layout(tmp_path / "root", images=340, shards=2)
    card = register_tiny(layout, "v1")
    shards = list_shards(layout)
    embed(layout, card, shards)
    config = IndexConfig(flat_below=200)
    first = build_or_update(layout, MODEL, "v1", shards[:1], config)
    assert (
        first.mode == "full" and first.reason == "no earlier build of this version" and first.build.index_type == "Flat"
    )
    checks = []
    real = id_check.check_unique
    monkeypatch.setattr(incremental, "check_unique", lambda *a, **k: checks.append("update") or real(*a, **k))
    monkeypatch.setattr(index_build, "check_unique", lambda *a, **k: checks.append("full") or real(*a, **k))
    grown = build_or_update(layout, MODEL, "v1", shards, config)
    assert (
        grown.mode == "full" and "340 vectors call for IVF" in grown.reason and grown.build.index_type.startswith("IVF")
    )
    assert checks == ["update"], "the fall back to a full build read every shard's ids a second time"
    again = build_or_update(layout, MODEL, "v1", shards, config)
    assert again.mode == "full" and "no new shards since" in again.reason


def test_a_build_without_shard_names_is_rebuilt_not_extended(registered):
    layout, card = registered
    shards = list_shards(layout)
    embed(layout, card, shards)
    old = build_index(layout, MODEL, "v1", shards[:2], IndexConfig())
    record = layout.store.read_json(f"{old.path}/build.json")
    del record["shard_names"]  # as written before builds recorded their shards
    layout.store.write_json(f"{old.path}/build.json", record)
    out = build_or_update(layout, MODEL, "v1", shards, IndexConfig())
    assert out.mode == "full" and "does not record which shards" in out.reason and out.build.vectors == 60


def test_an_unembedded_new_shard_is_refused_by_name(registered):
    layout, card = registered
    s0, s1, s2 = list_shards(layout)
    embed(layout, card, [s0, s1])
    build_or_update(layout, MODEL, "v1", [s0, s1], IndexConfig())
    with pytest.raises(IncompleteError, match=f"shard {s2} has no completion marker"):
        build_or_update(layout, MODEL, "v1", [s0, s1, s2], IndexConfig())


@pytest.mark.parametrize("damaged, why", [(INDEX_FILE, "does not match its sha256"), (IDS_FILE, "is unreadable")])
def test_a_damaged_base_build_falls_back_to_a_full_build(registered, damaged, why):
    layout, card = registered
    s0, s1, s2 = list_shards(layout)
    embed(layout, card, [s0, s1, s2])
    base = build_or_update(layout, MODEL, "v1", [s0, s1], IndexConfig(), model_created=card.created).build
    layout.store.write_bytes(f"{base.path}/{damaged}", b"bit rot")
    out = build_or_update(layout, MODEL, "v1", [s0, s1, s2], IndexConfig(), model_created=card.created)
    assert out.mode == "full" and base.build_id in out.reason and why in out.reason
    assert out.build.passed and out.build.vectors == 60 and out.build.shard_names == [s0, s1, s2]


def test_a_new_shard_repeating_an_indexed_id_is_refused_before_any_build(registered):
    # the registry sensor's tick check can be skipped (ids that are not range-partitioned, a shard written
    # behind its back): both build paths refuse first, naming both shards (the incremental path used to
    # find it only inside update_index, after reading the base build's ids, without naming the other shard)
    layout, card = registered
    s0, s1, _ = list_shards(layout)
    embed(layout, card, [s0, s1])
    base = build_or_update(layout, MODEL, "v1", [s0, s1], IndexConfig()).build
    first = read_shard(layout, s0)
    taken = int(first.image_ids[3])
    write_shard(layout, "z-late", pa.table({"image_id": pa.array([10_000, taken], pa.int64()), "uri": first.uris[:2]}))
    embed(layout, card, ["z-late"])
    for attempt in (build_or_update, build_index):
        with pytest.raises(ManifestError, match=f"image_id {taken} appears in manifest shards '{s0}' and 'z-late'"):
            attempt(layout, MODEL, "v1", [s0, s1, "z-late"], IndexConfig())
    assert latest_build(layout, MODEL, "v1").build_id == base.build_id  # nothing new was written
