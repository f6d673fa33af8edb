"""Near-line under the real dagster-daemon, with the search service on loopback: new shards land
while the system runs and their images are found through the HTTP API."""

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from dagster import AssetKey, DagsterInstance, MultiPartitionKey, materialize

from assets.embeddings import image_embeddings
from assets.index import faiss_index, search_index
from assets.models import model_version
from assets.resources import BackfillResource
from backfill.manifest import list_shards, read_shard, write_shard
from backfill.publish import read_pointer
from harness.local_instance import free_port, new_instance, start_daemon, start_search_service, stop, wait_for
from tests.conftest import MODEL, make_layout, register_tiny
from tests.e2e.conftest import IN_PROCESS, SMALL_BATCHES

pytestmark = pytest.mark.e2e

# held back, then landed while the system runs: the first while v1 serves, the second during v2's backfill
NEW, LATE = "shard-00002", "shard-00003"


def publish_v1_in_process(home: Path, layout) -> None:
    """v1 verified, embedded, indexed and published through the assets in this process (the daemon would
    take a minute more to get there on 2 cores); the instance records it as the daemon would."""
    register_tiny(layout, "v1")
    resources = {"backfill": BackfillResource(root=layout.store.root, batch_size=16, chunk_size=16)}
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("shard", list_shards(layout))
        instance.add_dynamic_partitions("model_version", ["v1"])
        assert materialize([model_version], partition_key="v1", instance=instance, resources=resources).success
        for shard in list_shards(layout):
            key = MultiPartitionKey({"model_version": "v1", "shard": shard})
            assert materialize([image_embeddings], partition_key=key, instance=instance, resources=resources).success
        assert materialize(
            [faiss_index, search_index], partition_key="v1", instance=instance, resources=resources
        ).success


@pytest.fixture
def system(tmp_path: Path):
    """A corpus of 4 shards of which the last 2 are held back, v1 published over the other 2; the daemon
    and the search service running."""
    home, root = tmp_path / "dagster_home", tmp_path / "root"
    layout = make_layout(root, images=120, shards=4)
    held = {shard: pq.read_table(layout.manifest(shard)) for shard in (NEW, LATE)}
    for shard in held:
        layout.store.rm(layout.manifest(shard))
    env = new_instance(home, root, BACKFILL_MODEL=MODEL, **SMALL_BATCHES, **IN_PROCESS)
    publish_v1_in_process(home, layout)
    daemon = start_daemon(env, tmp_path / "daemon.log")
    port = free_port()
    service = start_search_service(env, tmp_path / "serve.log", port, poll_s=0.2)
    url = f"http://127.0.0.1:{port}"

    def service_up():
        try:
            return requests.get(f"{url}/healthz", timeout=5).status_code in (200, 503)
        except requests.ConnectionError:
            return False

    try:
        wait_for(service_up, timeout=60, interval=0.5, what="backfill serve")
        yield layout, held, url, home, tmp_path
    finally:
        stop(service)
        stop(daemon)


def published(layout, version: str, vectors: int):
    pointer = read_pointer(layout, MODEL)
    return pointer if pointer and pointer["version"] == version and pointer["vectors"] == vectors else None


def serving(url: str) -> str | None:
    r = requests.get(f"{url}/healthz", timeout=10)
    return r.json().get("build_id") if r.status_code == 200 else None


def found(url: str, image_id: int):
    r = requests.get(f"{url}/search", params={"image_id": image_id, "k": 1}, timeout=10)
    return r.json() if r.status_code == 200 else None


def faiss_index_runs(home: Path, version: str) -> list[dict]:
    with DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(AssetKey("faiss_index"), limit=50).records
        return [
            {k: v.value for k, v in r.asset_materialization.metadata.items()}
            for r in records
            if r.asset_materialization.partition == version
        ]


def test_shards_landing_while_v1_serves_and_during_v2s_backfill_become_searchable(system):
    """One system, two landings (one daemon start and one v1 publish paid for both):
    a shard landing while v1 serves is added to v1 incrementally, without a full rebuild; a shard
    landing while v2's backfill runs is in v2's first published index."""
    layout, held, url, home, logs = system
    first = published(layout, "v1", 60)
    assert first and serving(url) == first["build_id"]

    landed = time.monotonic()
    write_shard(layout, NEW, held[NEW])
    new_ids = [int(i) for i in read_shard(layout, NEW).image_ids]
    answer = wait_for(
        lambda: found(url, new_ids[0]),
        timeout=240,  # ~60 s here when the machine is quiet; the timeouts allow a loaded one
        interval=0.5,
        what=f"a new image found through the API (logs in {logs})",
    )
    print(f"manifest landed -> searchable through the API: {time.monotonic() - landed:.1f}s")
    assert answer["version"] == "v1" and answer["hits"][0]["image_id"] == new_ids[0]
    assert all(found(url, i) for i in new_ids)
    pointer = read_pointer(layout, MODEL)
    assert pointer["vectors"] == 90 and pointer["previous_build_id"] == first["build_id"]
    runs = faiss_index_runs(home, "v1")
    assert [r["mode"] for r in runs] == ["incremental", "full"]  # newest first: one full build, then the update
    assert runs[0]["base_build_id"] == first["build_id"] and runs[0]["added_shards"] == [NEW]

    register_tiny(layout, "v2")
    # the first committed chunk of any v2 shard: the backfill is running
    wait_for(
        lambda: layout.store.ls(layout.embeddings(MODEL, "v2")),
        timeout=240,
        interval=0.2,
        what=f"v2's backfill under way (logs in {logs})",
    )
    assert read_pointer(layout, MODEL)["version"] == "v1", "v2 was published before the shard could land"
    write_shard(layout, LATE, held[LATE])  # lands while v2's backfill runs

    pointer = wait_for(
        lambda: published(layout, "v2", 120),
        timeout=300,
        interval=1,
        what=f"v2 published with the late shard (logs in {logs})",
    )
    # the service loads a published build on its next poll, not at the instant CURRENT flips
    wait_for(
        lambda: serving(url) == pointer["build_id"],
        timeout=60,
        interval=0.5,
        what=f"the service serving v2's build {pointer['build_id']} (logs in {logs})",
    )
    late_ids = [int(i) for i in read_shard(layout, LATE).image_ids]
    answers = [found(url, i) for i in late_ids]
    itself = [bool(a) and a["version"] == "v2" and a["hits"][0]["image_id"] == i for a, i in zip(answers, late_ids)]
    wrong = [(i, a) for ok, a, i in zip(itself, answers, late_ids) if not ok]
    assert not wrong, f"late images not found as themselves in v2: {wrong[:3]}"
    # v2 was never published without the late shard: every v2 index that passed covers all four shards
    assert all(r["shards"] == 4 for r in faiss_index_runs(home, "v2"))
