"""The finaliser: the tally, the reject gate, the rejects file and a typed marker with the same JSON as before."""

import json

import numpy as np
import pytest

from backfill.errors import ConfigError, RejectRateError
from backfill.finalise import MARKER, REJECTS, EmbedStats, ShardMarker, finalise, ids_sha256, read_marker, tally
from backfill.manifest import Shard
from backfill.storage import Layout, Store
from backfill.writer import Committed, chunk_name, write_chunk

# a marker as the engine wrote it before it had a type (asdict(EmbedStats) less the per-attempt fields)
OLD_MARKER = {
    "batch_size": 4, "chunk_size": 6, "chunks": 2, "device": "cpu", "embedded": 7, "ids_sha256": "ab" * 32,
    "images": 8, "model": "refcnn", "reasons": {"missing object": 1}, "rejects": 1, "shard": "shard-00000",
    "version": "v1",
}


def test_the_marker_reads_and_writes_the_json_of_before():
    marker = ShardMarker.from_json(OLD_MARKER)
    assert marker.images == 8 and marker.reasons == {"missing object": 1} and marker.chunk_size == 6
    assert marker.to_json() == OLD_MARKER
    assert ShardMarker.from_json({**OLD_MARKER, "added_later": 1}) == marker  # newer markers stay readable


def test_the_marker_of_stats_leaves_out_the_per_attempt_fields():
    stats = EmbedStats(**{k: v for k, v in OLD_MARKER.items() if k != "chunk_size"})
    stats.wall_s, stats.images_per_s, stats.chunks_resumed, stats.images_embedded_now = 3.0, 9.0, 1, 4
    stats.stage_s["forward"] = 1.0
    assert ShardMarker.of(stats, 6).to_json() == OLD_MARKER
    again = EmbedStats("shard-00000", "refcnn", "v1", images_embedded_now=4)
    ShardMarker.of(stats, 6).resumed(again)
    assert (again.images, again.rejects, again.chunks_resumed, again.images_embedded_now) == (8, 1, 2, 0)


def _shard_with_chunks(tmp_path):
    layout = Layout(Store.open(str(tmp_path)))
    out = layout.store.url("out")
    shard = Shard("s", np.arange(10, 18, dtype=np.int64), [f"/img/{i}.jpg" for i in range(8)])
    errors = [None, None, "missing object: /img/2.jpg", None]
    valid = np.array([1, 1, 0, 1], bool)
    write_chunk(layout, out, 0, 4, shard.image_ids[:4], np.ones((4, 2), np.float32), valid, errors)
    fresh = [Committed(4, shard.image_ids[4:], [None, "not an image: format not recognised", None, None])]
    return layout, out, shard, fresh


def test_tally_counts_resumed_and_fresh_chunks_in_row_order(tmp_path):
    layout, out, shard, fresh = _shard_with_chunks(tmp_path)
    stats = EmbedStats("s", "refcnn", "v1")
    errors = tally(layout, out, [(0, 4)], fresh, stats)
    assert errors[2].startswith("missing object") and errors[5].startswith("not an image") and len(errors) == 8
    assert (stats.images, stats.embedded, stats.rejects) == (8, 6, 2)
    assert stats.reasons == {"missing object": 1, "not an image": 1} and stats.ids_sha256 == ids_sha256(shard.image_ids)


def test_finalise_writes_the_rejects_then_the_marker(tmp_path):
    layout, out, shard, fresh = _shard_with_chunks(tmp_path)
    stats = EmbedStats("s", "refcnn", "v1")
    errors = tally(layout, out, [(0, 4)], fresh, stats)
    assert read_marker(layout, out) is None
    marker = finalise(layout, out, shard, errors, stats, max_reject_rate=0.5, chunk_size=4)
    assert read_marker(layout, out) == marker and marker.rejects == 2 and marker.chunk_size == 4
    assert json.loads(layout.store.read_bytes(f"{out}/{MARKER}")) == marker.to_json()
    assert set(layout.store.ls(out)) == {chunk_name(0, 4), REJECTS, MARKER}


def test_the_reject_gate_removes_the_chunks_and_names_the_reasons(tmp_path):
    layout, out, shard, fresh = _shard_with_chunks(tmp_path)
    stats = EmbedStats("s", "refcnn", "v1")
    errors = tally(layout, out, [(0, 4)], fresh, stats)
    with pytest.raises(RejectRateError, match=r"shard s: 2/8 images rejected \(25.0% > max_reject_rate 10.0%\)"):
        finalise(layout, out, shard, errors, stats, max_reject_rate=0.1, chunk_size=4)
    assert layout.store.ls(out) == []


def test_ids_out_of_order_are_refused(tmp_path):
    layout, out, shard, fresh = _shard_with_chunks(tmp_path)
    stats = EmbedStats("s", "refcnn", "v1")
    errors = tally(layout, out, [(0, 4)], [Committed(4, shard.image_ids[4:][::-1], fresh[0].errors)], stats)
    with pytest.raises(ConfigError, match="committed chunks do not hold the manifest's ids in order"):
        finalise(layout, out, shard, errors, stats, max_reject_rate=0.5, chunk_size=4)
    assert read_marker(layout, out) is None
