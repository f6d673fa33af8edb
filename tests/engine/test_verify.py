"""One verification of a version's data: verify_shard per shard, verify_version for chunks, index and pointer."""

import pytest

from backfill.embed import MARKER, is_chunk
from backfill.publish import publish
from backfill.verify import verify_shard, verify_version
from tests.conftest import MODEL
from tests.engine.test_publish_search import build_version


@pytest.fixture
def published(registered):
    """Every shard of tiny v1 embedded (chunks of 8), indexed and published: the layout."""
    layout, card = registered
    publish(layout, MODEL, build_version(layout, card).build_id)
    return layout


def _chunks(layout, shard: str) -> list[str]:
    out = layout.embeddings(MODEL, "v1", shard)
    return [f"{out}/{n}" for n in layout.store.ls(out) if is_chunk(n)]


def test_a_clean_published_version_passes_both(published):
    verdict = verify_version(published, MODEL, "v1")
    assert verdict.ok and (verdict.rows, verdict.rejects, verdict.problems) == (60, 0, ()), verdict
    shard = verify_shard(published, MODEL, "v1", "shard-00000")
    assert shard.ok and shard.rows == 20


def test_a_lost_chunk_fails_both(published):
    first = _chunks(published, "shard-00000")[0]
    published.store.rm(first)
    verdict = verify_version(published, MODEL, "v1")
    assert (verdict.lost, verdict.duplicated, verdict.ok) == (8, 0, False)
    assert verdict.index_mismatch == 8  # the index still holds the lost rows
    assert verify_shard(published, MODEL, "v1", "shard-00000").detail == "8 missing, 0 not in manifest, 0 duplicated"


def test_a_chunk_committed_twice_is_counted_as_duplicated(published):
    first = _chunks(published, "shard-00001")[0]
    # a second name for the same rows, as a resume that missed a committed chunk would write
    published.store.write_bytes(first.replace("rows-", "rows-9"), published.store.read_bytes(first))
    verdict = verify_version(published, MODEL, "v1")
    assert (verdict.lost, verdict.duplicated, verdict.ok) == (0, 8, False)
    assert not verify_shard(published, MODEL, "v1", "shard-00001").ok


def test_a_missing_marker_and_no_pointer_are_problems(registered):
    layout, card = registered
    build_version(layout, card)  # built, never published
    layout.store.rm(f"{layout.embeddings(MODEL, 'v1', 'shard-00002')}/{MARKER}")
    verdict = verify_version(layout, MODEL, "v1")
    assert not verdict.pointer_ok and not verdict.ok
    assert "shard-00002: no completion marker" in verdict.problems
    assert any(p.startswith("CURRENT names None") for p in verdict.problems)
    assert verify_shard(layout, MODEL, "v1", "shard-00002").detail == "no completion marker"
