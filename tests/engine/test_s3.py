"""The engine on a real S3-compatible server (SeaweedFS on loopback): same code, an s3:// root."""

import pytest

from backfill.config import EmbedConfig, IndexConfig
from backfill.embed import embed_shard
from backfill.errors import ConfigError, IncompleteError, RetryableError
from backfill.images import make_fetcher
from backfill.index import INDEX_FILE, build_index
from backfill.manifest import list_shards, read_shard
from backfill.publish import publish
from backfill.runtime import load_model
from backfill.search import Searcher
from backfill.storage import Layout, Store, local_copy
from backfill.verify import verify_version
from tests.conftest import MODEL, make_layout, register_tiny


def _keys(store: Store, prefix: str) -> list[str]:
    return sorted(k[len(store.root) + 1 :] for k in store.fs.find(prefix))


def test_store_reads_writes_and_lists_on_s3(s3_root):
    store = Store.open(s3_root)
    assert store.display(store.url("a", "b.json")) == f"{s3_root}/a/b.json"
    assert store.ls(store.url("nothing-here")) == []
    store.write_json(store.url("a", "b.json"), {"x": 1})
    store.write_bytes(store.url("a", "c.bin"), b"\0" * 10)
    assert store.read_json(store.url("a", "b.json")) == {"x": 1}
    assert store.ls(store.url("a")) == ["b.json", "c.bin"]
    assert store.exists(store.url("a", "c.bin")) and not store.exists(store.url("a", "d.bin"))
    store.rm(store.url("a"), recursive=True)
    assert store.ls(store.url("a")) == []


def test_whole_loop_on_s3_commits_by_single_puts_and_serves_from_a_verified_cache(s3_root, tmp_path, monkeypatch):
    layout = make_layout(s3_root, images=48, shards=2)
    assert read_shard(layout, "shard-00000").uris[0].startswith(s3_root + "/corpus/images/")
    card = register_tiny(layout, "v1")
    model = load_model(layout, card)
    puts: list[str] = []
    real_pipe = layout.store.fs.pipe_file
    monkeypatch.setattr(
        layout.store.fs, "pipe_file", lambda path, data, **kw: (puts.append(path), real_pipe(path, data, **kw))[1]
    )
    for shard in list_shards(layout):
        embed_shard(layout, shard, model, EmbedConfig(batch_size=8, chunk_size=8, torch_threads=1, fetch_workers=8))
    out = layout.embeddings(MODEL, "v1", "shard-00000")
    # a chunk is one PUT of its final key, the marker last; nothing temporary is ever written
    shard0 = [p.rsplit("/", 1)[-1] for p in puts if p.startswith(out + "/")]
    assert shard0 == [f"rows-{s:012d}-{s + 8:012d}.parquet" for s in range(0, 24, 8)] + [
        "rejects.parquet",
        "_SUCCESS.json",
    ]
    assert not [k for k in _keys(layout.store, layout.store.root) if ".tmp" in k or ".part" in k]

    build = build_index(layout, MODEL, "v1", list_shards(layout), IndexConfig(), model_created=card.created)
    assert publish(layout, MODEL, build.build_id).published
    result = verify_version(layout, MODEL, "v1")
    assert (result.lost, result.duplicated, result.index_mismatch, result.pointer_ok) == (0, 0, 0, True), result

    cache = tmp_path / "cache"
    uri = read_shard(layout, "shard-00001").uris[5]
    answer = Searcher(layout, MODEL, cache_dir=str(cache)).search_image(make_fetcher()(uri), k=3)
    assert answer.hits[0].uri == uri and answer.build_id == build.build_id
    (cached,) = [p for p in cache.rglob("*") if p.is_file()]
    assert cached.name == f"{build.index_sha256}-{INDEX_FILE}"

    # a damaged cache entry is fetched again, not served
    cached.write_bytes(b"garbage")
    again = Searcher(layout, MODEL, cache_dir=str(cache)).search_image(make_fetcher()(uri), k=3)
    assert again.hits[0].uri == uri and cached.stat().st_size > 100


def test_index_file_not_matching_its_checksum_is_never_loaded(s3_root, tmp_path):
    store = Store.open(s3_root)
    store.write_bytes(store.url("idx", INDEX_FILE), b"tampered")
    with pytest.raises(IncompleteError, match="does not match its recorded sha256"):
        local_copy(store, store.url("idx", INDEX_FILE), "0" * 64, str(tmp_path))
    assert not list(tmp_path.rglob("*.faiss")) and not list(tmp_path.rglob("*.part"))


def test_endpoint_setting_is_validated(monkeypatch):
    monkeypatch.setenv("BACKFILL_S3_ENDPOINT_URL", "minio:9000")
    with pytest.raises(ConfigError, match="BACKFILL_S3_ENDPOINT_URL='minio:9000' is not a URL"):
        Store.open("s3://bucket/root")


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    """A server of its own with an object on it, then stopped: (its settings, the root). Module scope:
    set up before the no-sleep guard of engine tests, since starting a server waits."""
    from harness.local_s3 import LocalS3

    server = LocalS3(tmp_path_factory.mktemp("outage")).start()
    try:
        root = server.make_bucket("outage") + "/root"
        server.filesystem().pipe_file(root.removeprefix("s3://") + "/img.jpg", b"\xff\xd8")
    finally:
        server.stop()
    return server.env(), root


def test_an_unreachable_store_is_retryable_and_never_a_reject(outage, monkeypatch):
    env, root = outage
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries only slow the test down
    store = Store.open(root)
    with pytest.raises(RetryableError, match="unreachable") as info:
        make_fetcher()(f"{root}/img.jpg")
    assert "img.jpg" in str(info.value) and env["AWS_SECRET_ACCESS_KEY"] not in str(info.value)
    with pytest.raises(RetryableError, match="could not list"):
        store.ls(store.url(""))
    with pytest.raises(RetryableError, match="could not write"):
        store.write_bytes(store.url("x"), b"1")


def test_layout_on_s3_names_keys_below_the_prefix(s3_root):
    layout = Layout(Store.open(s3_root))
    assert layout.store.display(layout.pointer(MODEL)) == f"{s3_root}/indexes/{MODEL}/CURRENT"


def test_object_store_reads_are_one_get_each_with_a_pool_for_every_request_in_flight(s3_root):
    # botocore's default pool of 10 connections capped the fetch stage at 10 GETs in flight,
    # and s3fs's HEAD-before-GET doubled the requests per image
    store = Store.open(s3_root)
    store.write_bytes(store.url("x"), b"1")
    assert store.read_bytes(store.url("x")) == b"1"  # the client exists once a request was made
    assert store.fs.max_concurrency == 1
    assert store.fs.s3.meta.config.max_pool_connections >= EmbedConfig().fetch_workers


def test_a_plans_slots_calibrate_side_by_side_from_an_s3_root(s3_root):
    # each slot reopens the root from its URL and reads the card and the model from S3, as a partition does
    from backfill.calibrate import calibrate

    layout = make_layout(s3_root, images=24, shards=2)
    register_tiny(layout, "v1")
    c = calibrate(layout, MODEL, "v1", EmbedConfig(batch_size=4, chunk_size=4, fetch_workers=4), images=8, slots=2)
    assert c.slots == 2 and c.images == 8 and c.rejects == 0 and c.img_s > 0
