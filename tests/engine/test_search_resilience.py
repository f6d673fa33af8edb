"""The Searcher under faults: storage blips, builds that cannot load, and its download cache."""

import os
import threading
import uuid

import pytest

from backfill import search
from backfill.config import IndexConfig
from backfill.errors import IncompleteError, RetryableError
from backfill.index import IDS_FILE, build_index
from backfill.manifest import list_shards
from backfill.publish import publish
from backfill.search import Searcher
from backfill.service import _poll
from backfill.storage import prune_cache
from tests.conftest import MODEL, make_layout, register_tiny
from tests.engine.test_publish_search import build_version, query_bytes


def counting_loads(monkeypatch, searcher):
    calls = []
    real = searcher._load

    def load(build_id, previous):
        calls.append(build_id)
        return real(build_id, previous)

    monkeypatch.setattr(searcher, "_load", load)
    return calls


def test_a_pointer_read_blip_keeps_the_loaded_build_serving(registered, monkeypatch):
    layout, card = registered
    b1 = build_version(layout, card)
    publish(layout, MODEL, b1.build_id)
    searcher = Searcher(layout, MODEL)
    _, data = query_bytes(layout)
    assert searcher.search_image(data).build_id == b1.build_id

    def unreachable(layout, model):
        raise RetryableError("could not read CURRENT: store unreachable (ConnectTimeoutError)")

    real = search.read_pointer
    monkeypatch.setattr(search, "read_pointer", unreachable)
    answer = searcher.search_image(data)
    assert answer.build_id == b1.build_id and answer.hits
    assert "could not read CURRENT" in searcher.load_error and b1.build_id in searcher.load_error
    monkeypatch.setattr(search, "read_pointer", real)
    assert searcher.current().build_id == b1.build_id and searcher.load_error is None


def test_a_pointer_read_blip_before_any_load_is_still_an_error(registered, monkeypatch):
    layout, card = registered
    publish(layout, MODEL, build_version(layout, card).build_id)

    def unreachable(layout, model):
        raise RetryableError("store unreachable")

    monkeypatch.setattr(search, "read_pointer", unreachable)
    with pytest.raises(RetryableError):
        Searcher(layout, MODEL).current()


def damage_ids(layout, build):
    layout.store.write_bytes(f"{layout.index_build(MODEL, build.build_id)}/{IDS_FILE}", b"not parquet")


def test_a_build_with_a_damaged_ids_file_falls_back_and_is_not_reloaded(registered, monkeypatch):
    layout, card1 = registered
    b1 = build_version(layout, card1)
    publish(layout, MODEL, b1.build_id)
    searcher = Searcher(layout, MODEL)
    _, data = query_bytes(layout)
    assert searcher.search_image(data).build_id == b1.build_id
    b2 = build_version(layout, register_tiny(layout, "v2"))
    damage_ids(layout, b2)  # pyarrow raises ArrowInvalid, not a BackfillError
    publish(layout, MODEL, b2.build_id)
    loads = counting_loads(monkeypatch, searcher)
    for _ in range(3):
        assert searcher.search_image(data).build_id == b1.build_id
    assert loads == [b2.build_id]  # remembered as broken: not downloaded on every request or poll
    assert b2.build_id in searcher.load_error and "could not be loaded" in searcher.load_error
    b3 = build_index(layout, MODEL, "v2", list_shards(layout), IndexConfig(), model_created=b2.model_created)
    publish(layout, MODEL, b3.build_id)  # CURRENT moves on: the new build is tried
    assert searcher.search_image(data).build_id == b3.build_id
    assert loads == [b2.build_id, b3.build_id] and searcher.load_error is None


def test_a_first_build_that_cannot_load_is_a_backfill_error_naming_it(registered, monkeypatch):
    layout, card = registered
    b1 = build_version(layout, card)
    damage_ids(layout, b1)
    publish(layout, MODEL, b1.build_id)
    searcher = Searcher(layout, MODEL)
    loads = counting_loads(monkeypatch, searcher)
    for _ in range(2):
        with pytest.raises(IncompleteError, match=b1.build_id):
            searcher.current()
    assert loads == [b1.build_id]


def test_the_poller_survives_unexpected_errors():
    stop = threading.Event()

    class Flaky:
        model_name, calls = MODEL, 0

        def current(self):
            self.calls += 1
            if self.calls == 3:
                stop.set()
            raise (RuntimeError if self.calls == 1 else OSError)("boom")

    flaky = Flaky()
    _poll(flaky, stop, 0.001)
    assert flaky.calls == 3


def test_swapping_builds_prunes_the_download_cache(tmp_path):
    # memory:// is not a local filesystem, so index files go through local_copy's download cache
    layout = make_layout(f"memory://cache-{uuid.uuid4().hex[:8]}/root")
    cache = tmp_path / "cache"
    b1 = build_version(layout, register_tiny(layout, "v1"))
    publish(layout, MODEL, b1.build_id)
    searcher = Searcher(layout, MODEL, cache_dir=str(cache))
    assert searcher.current().build_id == b1.build_id
    stray = cache / "ab" / "notes.txt"  # not a cache entry: left alone
    stray.parent.mkdir()
    stray.write_text("x")
    cached = lambda: sorted(name for _, _, files in os.walk(cache) for name in files if name != "notes.txt")  # noqa: E731
    assert cached() == [f"{b1.index_sha256}-index.faiss"]
    b2 = build_version(layout, register_tiny(layout, "v2"))
    publish(layout, MODEL, b2.build_id)
    assert searcher.current().build_id == b2.build_id
    assert cached() == [f"{b2.index_sha256}-index.faiss"]
    assert stray.exists()


def test_prune_cache_keeps_the_named_entries_and_partial_downloads(tmp_path):
    keep, drop = "a" * 64, "b" * 64
    for name in (f"{keep}-index.faiss", f"{drop}-index.faiss", f"{drop}-index.faiss.1234abcd.part"):
        folder = tmp_path / name[:2]
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(b"x")
    removed = prune_cache(str(tmp_path), {keep})
    assert removed == [str(tmp_path / "bb" / f"{drop}-index.faiss")]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        f"{keep}-index.faiss",
        f"{drop}-index.faiss.1234abcd.part",
    ]
    assert prune_cache(str(tmp_path / "missing"), {keep}) == []
