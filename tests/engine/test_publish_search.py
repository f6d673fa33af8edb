import threading

import pytest

from backfill.config import EmbedConfig, IndexConfig
from backfill.embed import embed_shard
from backfill.errors import BackfillError, QualityGateError
from backfill.index import build_index, latest_build
from backfill.manifest import list_shards, read_shard
from backfill.publish import publish, read_pointer
from backfill.runtime import load_model
from backfill.search import Searcher
from tests.conftest import MODEL, register_tiny


def build_version(layout, card, **index_kwargs):
    model = load_model(layout, card)
    for shard in list_shards(layout):
        embed_shard(layout, shard, model, EmbedConfig(batch_size=8, chunk_size=8, torch_threads=1))
    return build_index(
        layout, MODEL, card.version, list_shards(layout), IndexConfig(**index_kwargs), model_created=card.created
    )


def query_bytes(layout):
    uri = read_shard(layout, "shard-00000").uris[0]
    with open(uri, "rb") as f:
        return read_shard(layout, "shard-00000").image_ids[0], f.read()


def test_publish_then_search_finds_the_query_image(registered):
    layout, card = registered
    build = build_version(layout, card)
    result = publish(layout, MODEL, build.build_id)
    assert result.published and read_pointer(layout, MODEL)["build_id"] == build.build_id
    image_id, data = query_bytes(layout)
    answer = Searcher(layout, MODEL).search_image(data, k=5)
    assert answer.version == "v1" and answer.build_id == build.build_id
    assert answer.hits[0].image_id == image_id and answer.hits[0].score == pytest.approx(1.0, abs=1e-2)
    assert len(answer.hits) == 5


def test_search_before_anything_is_published(registered):
    layout, _ = registered
    with pytest.raises(BackfillError, match="no index is published"):
        Searcher(layout, MODEL).current()


def test_failed_gate_publishes_nothing(registered):
    layout, card = registered
    good = build_version(layout, card)
    publish(layout, MODEL, good.build_id)
    bad = build_index(
        layout,
        MODEL,
        "v1",
        list_shards(layout),
        IndexConfig(flat_below=10, pq_from=11, pq_m=2, target_recall=1.0, n_queries=20),
    )
    with pytest.raises(QualityGateError, match="below its target"):
        publish(layout, MODEL, bad.build_id)
    assert read_pointer(layout, MODEL)["build_id"] == good.build_id


def test_newer_version_swaps_and_older_does_not_come_back(registered):
    layout, card1 = registered
    b1 = build_version(layout, card1)
    publish(layout, MODEL, b1.build_id)
    searcher = Searcher(layout, MODEL)
    _, data = query_bytes(layout)
    assert searcher.search_image(data).version == "v1"

    card2 = register_tiny(layout, "v2")
    b2 = build_version(layout, card2)
    assert publish(layout, MODEL, b2.build_id).published
    assert searcher.search_image(data).version == "v2"  # the same searcher follows the pointer
    assert read_pointer(layout, MODEL)["previous_build_id"] == b1.build_id

    # a rebuild of v1 (e.g. after a new shard) must not take the pointer back
    again = publish(layout, MODEL, b1.build_id)
    assert not again.published and "newer" in again.reason
    assert publish(layout, MODEL, b1.build_id, force=True).published  # an explicit rollback does


def test_searches_during_a_swap_never_mix_builds(registered):
    layout, card1 = registered
    b1 = build_version(layout, card1)
    publish(layout, MODEL, b1.build_id)
    card2 = register_tiny(layout, "v2")
    b2 = build_version(layout, card2)
    searcher = Searcher(layout, MODEL)
    image_id, data = query_bytes(layout)
    seen, errors = [], []
    started, swap_done = threading.Event(), threading.Event()

    def query_until_swapped():
        try:
            while True:
                r = searcher.search_image(data, k=3)
                # a mix (one build's model with the other's index) would not find the query itself
                seen.append((r.version, r.build_id, r.hits[0].image_id, round(r.hits[0].score, 2)))
                started.set()
                if swap_done.is_set() and r.version == "v2":
                    return
        except Exception as exc:  # a search must never fail during a swap
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=query_until_swapped)
    thread.start()
    started.wait(timeout=60)
    publish(layout, MODEL, b2.build_id)
    swap_done.set()
    thread.join(timeout=60)
    assert not errors
    assert {(v, b) for v, b, _, _ in seen} == {("v1", b1.build_id), ("v2", b2.build_id)}
    assert {(top, score) for _, _, top, score in seen} == {(image_id, 1.0)}


def test_a_build_that_cannot_load_leaves_the_previous_one_serving(registered):
    layout, card1 = registered
    b1 = build_version(layout, card1)
    publish(layout, MODEL, b1.build_id)
    searcher = Searcher(layout, MODEL)
    _, data = query_bytes(layout)
    assert searcher.search_image(data).build_id == b1.build_id
    card2 = register_tiny(layout, "v2")
    b2 = build_version(layout, card2)
    publish(layout, MODEL, b2.build_id)
    layout.store.rm(f"{layout.model_dir(MODEL, 'v2')}/model.pt")  # the new build's model is gone
    answer = searcher.search_image(data)
    assert answer.build_id == b1.build_id and answer.hits
    assert b2.build_id in searcher.load_error and "artifact missing" in searcher.load_error


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even except-Exception handlers."""


@pytest.mark.parametrize("writes_before_kill", [0, 1, 2])
def test_killing_the_index_build_at_any_write_leaves_the_old_index_serving(registered, monkeypatch, writes_before_kill):
    layout, card1 = registered
    b1 = build_version(layout, card1)
    publish(layout, MODEL, b1.build_id)
    card2 = register_tiny(layout, "v2")
    model = load_model(layout, card2)
    for shard in list_shards(layout):
        embed_shard(layout, shard, model, EmbedConfig(batch_size=8, chunk_size=8, torch_threads=1))

    real_write = type(layout.store).write_bytes
    calls = []

    def dying_write(self, path, data):
        # only the index build's own writes are counted (the id check may first write the shards' id sidecars)
        if "/indexes/" in path:
            if len(calls) == writes_before_kill:
                raise Killed(path)
            calls.append(path)
        return real_write(self, path, data)

    monkeypatch.setattr(type(layout.store), "write_bytes", dying_write)
    with pytest.raises(Killed):
        build_index(layout, MODEL, "v2", list_shards(layout), IndexConfig(), model_created=card2.created)
    monkeypatch.setattr(type(layout.store), "write_bytes", real_write)

    assert read_pointer(layout, MODEL)["build_id"] == b1.build_id  # the old index still serves
    assert latest_build(layout, MODEL, "v2") is None  # a build without build.json does not exist
    _, data = query_bytes(layout)
    assert Searcher(layout, MODEL).search_image(data).build_id == b1.build_id
    retry = build_index(layout, MODEL, "v2", list_shards(layout), IndexConfig(), model_created=card2.created)
    assert publish(layout, MODEL, retry.build_id).published
