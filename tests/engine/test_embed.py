import numpy as np
import pyarrow as pa
import pytest

from backfill.config import EmbedConfig
from backfill.embed import MARKER, REJECTS, embed_shard, is_chunk, load_embeddings
from backfill.errors import ConfigError, RejectRateError
from backfill.manifest import read_shard, write_shard
from backfill.runtime import load_model
from tests.conftest import MODEL

CONFIG = EmbedConfig(batch_size=4, chunk_size=6, fetch_workers=4, decode_workers=2, torch_threads=1)


class Preempted(Exception):
    pass


def test_embed_shard_writes_chunks_and_marker(registered):
    layout, card = registered
    stats = embed_shard(layout, "shard-00000", load_model(layout, card), CONFIG)
    assert (stats.images, stats.rejects, stats.chunks, stats.chunks_resumed) == (20, 0, 4, 0)
    out = layout.embeddings(MODEL, "v1", "shard-00000")
    names = layout.store.ls(out)
    assert MARKER in names and REJECTS in names and len([n for n in names if is_chunk(n)]) == 4
    ids, vectors, valid = load_embeddings(layout, MODEL, "v1", "shard-00000")
    assert np.array_equal(ids, read_shard(layout, "shard-00000").image_ids)
    assert valid.all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-2)


def test_killed_partition_resumes_after_last_committed_chunk(registered, tmp_path):
    layout, card = registered
    model = load_model(layout, card)
    reference = embed_shard(layout, "shard-00001", model, CONFIG)
    ref_ids, ref_vecs, _ = load_embeddings(layout, MODEL, "v1", "shard-00001")
    layout.store.rm(layout.embeddings(MODEL, "v1", "shard-00001"), recursive=True)

    def crash_after_two(chunk: int) -> None:
        if chunk == 1:
            raise Preempted

    with pytest.raises(Preempted):
        embed_shard(layout, "shard-00001", model, CONFIG, on_chunk_committed=crash_after_two)
    assert not layout.store.exists(f"{layout.embeddings(MODEL, 'v1', 'shard-00001')}/{MARKER}")
    resumed = embed_shard(layout, "shard-00001", model, CONFIG)
    assert resumed.chunks_resumed == 2
    assert resumed.images_embedded_now == reference.images - 12  # only rows after the committed chunks
    ids, vecs, _ = load_embeddings(layout, MODEL, "v1", "shard-00001")
    assert np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-3)


def test_completed_shard_is_not_redone(registered):
    layout, card = registered
    model = load_model(layout, card)
    embed_shard(layout, "shard-00000", model, CONFIG)
    again = embed_shard(layout, "shard-00000", model, CONFIG)
    assert again.images_embedded_now == 0 and again.images == 20


def test_changed_chunk_size_is_refused(registered):
    layout, card = registered
    model = load_model(layout, card)
    with pytest.raises(Preempted):
        embed_shard(layout, "shard-00000", model, CONFIG, on_chunk_committed=lambda c: (_ for _ in ()).throw(Preempted()))
    with pytest.raises(ConfigError, match="chunk_size must stay fixed"):
        embed_shard(layout, "shard-00000", model, EmbedConfig(chunk_size=5, batch_size=4))


def _bad_shard(layout, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    good = read_shard(layout, "shard-00000").uris[:8]
    uris = [*good, str(tmp_path / "empty.jpg"), str(tmp_path / "text.jpg"), str(tmp_path / "missing.jpg"), None]
    write_shard(layout, "bad", pa.table({"image_id": pa.array(range(1000, 1000 + len(uris)), pa.int64()), "uri": pa.array(uris, pa.string())}))


def test_bad_images_become_rejects_with_reasons(registered, tmp_path):
    layout, card = registered
    _bad_shard(layout, tmp_path)
    stats = embed_shard(layout, "bad", load_model(layout, card), EmbedConfig(batch_size=4, chunk_size=6, max_reject_rate=0.5))
    assert (stats.images, stats.rejects) == (12, 4)
    assert stats.reasons == {"empty file (0 bytes)": 1, "not an image": 1, "missing object": 1, "manifest uri is null or empty": 1}
    ids, _, valid = load_embeddings(layout, MODEL, "v1", "bad")
    assert valid.tolist() == [True] * 8 + [False] * 4


def test_reject_rate_over_threshold_fails_naming_shard_and_reasons(registered, tmp_path):
    layout, card = registered
    _bad_shard(layout, tmp_path)
    with pytest.raises(RejectRateError, match=r"shard bad: 4/12 images rejected .* top reasons: .*chunks were removed"):
        embed_shard(layout, "bad", load_model(layout, card), EmbedConfig(batch_size=4, chunk_size=6, max_reject_rate=0.2))
    # nothing is left to resume from: once the cause is fixed, a rerun embeds the shard again
    assert layout.store.ls(layout.embeddings(MODEL, "v1", "bad")) == []
    stats = embed_shard(layout, "bad", load_model(layout, card), EmbedConfig(batch_size=4, chunk_size=6, max_reject_rate=0.5))
    assert stats.chunks_resumed == 0 and stats.images_embedded_now == 8


def test_a_chunk_lost_after_completion_is_embedded_again(registered):
    layout, card = registered
    model = load_model(layout, card)
    embed_shard(layout, "shard-00000", model, CONFIG)
    out = layout.embeddings(MODEL, "v1", "shard-00000")
    lost = [n for n in layout.store.ls(out) if is_chunk(n)][1]
    layout.store.rm(f"{out}/{lost}")
    again = embed_shard(layout, "shard-00000", model, CONFIG)
    assert again.chunks_resumed == 3 and again.images_embedded_now == 6
    assert lost in layout.store.ls(out) and MARKER in layout.store.ls(out)


def test_stats_say_where_the_time_went(registered):
    layout, card = registered
    stats = embed_shard(layout, "shard-00000", load_model(layout, card), CONFIG)
    main = {"wait_batch", "forward", "write_wait", "other"}
    assert main | {"writer_results", "writer_write"} == set(stats.stage_s)
    assert all(v >= 0 for v in stats.stage_s.values())
    assert sum(stats.stage_s[k] for k in main) == pytest.approx(stats.wall_s, rel=1e-6)
    assert stats.stage_s["writer_write"] > 0 and stats.stage_s["forward"] > 0


def test_prefetch_depth_does_not_change_the_vectors(registered):
    layout, card = registered
    model = load_model(layout, card)
    embed_shard(layout, "shard-00000", model, CONFIG)
    ids, ref, _ = load_embeddings(layout, MODEL, "v1", "shard-00000")
    layout.store.rm(layout.embeddings(MODEL, "v1", "shard-00000"), recursive=True)
    deep = EmbedConfig(batch_size=4, chunk_size=6, fetch_workers=4, decode_workers=2, torch_threads=1, prefetch_batches=8)
    embed_shard(layout, "shard-00000", model, deep)
    ids2, vecs, _ = load_embeddings(layout, MODEL, "v1", "shard-00000")
    assert np.array_equal(ids, ids2) and np.array_equal(vecs, ref)
