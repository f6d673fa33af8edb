"""The real thing: dagster-daemon and dagster-webserver on loopback, a version registered, a backfill, a search."""

import os
import shutil
from pathlib import Path

import pytest
import requests

from backfill.manifest import read_shard
from backfill.publish import read_pointer
from backfill.search import Searcher
from ops.local_instance import REPO, free_port, init_instance, start_daemon, start_webserver, stop, wait_automation_ready, wait_for
from tests.conftest import MODEL, make_layout, register_tiny

pytestmark = pytest.mark.e2e

BACKFILLS = """
{ partitionBackfillsOrError { __typename ... on PartitionBackfills { results {
    id status numPartitions isAssetBackfill
    assetBackfillData { assetBackfillStatuses { __typename
      ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted numPartitionsMaterialized numPartitionsFailed } } }
} } } }
"""

PUBLISHED = """
{ assetOrError(assetKey: {path: ["search_index"]}) { __typename ... on Asset {
    assetMaterializations(limit: 5) { partition metadataEntries { label ... on BoolMetadataEntry { boolValue } } }
} } }
"""


@pytest.fixture
def dagster(tmp_path: Path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    root = tmp_path / "root"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "BACKFILL_ROOT": str(root),
        "BACKFILL_SENSOR_INTERVAL": "2",
        "BACKFILL_AUTOMATION_INTERVAL": "2",
        "BACKFILL_BATCH_SIZE": "16",
        "BACKFILL_CHUNK_SIZE": "16",
    }
    port = free_port()
    init_instance(home)
    web = start_webserver(env, tmp_path / "webserver.log", port)
    daemon = start_daemon(env, tmp_path / "daemon.log")
    url = f"http://127.0.0.1:{port}/graphql"

    def graphql(query: str) -> dict:
        response = requests.post(url, json={"query": query}, timeout=30)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body
        return body["data"]

    def server_up():
        try:
            return requests.get(f"http://127.0.0.1:{port}/server_info", timeout=5).ok
        except requests.ConnectionError:
            return False

    try:
        wait_for(server_up, timeout=120, what="dagster-webserver")
        wait_automation_ready(tmp_path / "daemon.log")
        yield make_layout(root, images=90, shards=3), graphql, tmp_path
    finally:
        stop(daemon)
        stop(web)


def test_register_version_backfill_publish_search(dagster):
    layout, graphql, logs = dagster
    register_tiny(layout, "v1")

    def completed_backfill():
        assert (logs / "daemon.log").exists()
        for b in graphql(BACKFILLS)["partitionBackfillsOrError"]["results"]:
            assert b["status"] not in ("FAILED", "CANCELED"), b
            if b["status"] == "COMPLETED_SUCCESS":
                return b
        return None

    backfill = wait_for(completed_backfill, timeout=300, interval=2, what=f"a completed backfill (logs in {logs})")
    (status,) = backfill["assetBackfillData"]["assetBackfillStatuses"]
    assert status["assetKey"]["path"] == ["image_embeddings"]
    assert (status["numPartitionsTargeted"], status["numPartitionsMaterialized"], status["numPartitionsFailed"]) == (3, 3, 0)

    def published():
        asset = graphql(PUBLISHED)["assetOrError"]
        if asset["__typename"] != "Asset":
            return None
        for m in asset["assetMaterializations"]:
            flags = {e["label"]: e.get("boolValue") for e in m["metadataEntries"]}
            if m["partition"] == "v1" and flags.get("published"):
                return m
        return None

    wait_for(published, timeout=180, interval=2, what="search_index v1 published")
    pointer = read_pointer(layout, MODEL)
    assert pointer["version"] == "v1" and pointer["vectors"] == 90

    shard = read_shard(layout, "shard-00001")
    with open(shard.uris[3], "rb") as f:
        answer = Searcher(layout, MODEL).search_image(f.read(), k=5)
    assert answer.version == "v1" and answer.hits[0].image_id == int(shard.image_ids[3])
