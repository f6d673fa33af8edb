"""The real thing: daemon and webserver on loopback, runs in PostgreSQL, a version registered, a backfill, a search."""

from pathlib import Path

import pytest

from backfill.images import make_fetcher
from backfill.manifest import read_shard
from backfill.publish import read_pointer
from backfill.search import Searcher
from harness.local_instance import wait_for
from harness.local_postgres import Server
from tests.conftest import MODEL, make_layout, register_tiny
from tests.e2e.conftest import running_dagster

pytestmark = pytest.mark.e2e

BACKFILLS = """
{ partitionBackfillsOrError { __typename ... on PartitionBackfills { results {
    id status numPartitions isAssetBackfill
    assetBackfillData { assetBackfillStatuses { __typename
      ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted \
numPartitionsMaterialized numPartitionsFailed } } }
} } } }
"""

PUBLISHED = """
{ assetOrError(assetKey: {path: ["search_index"]}) { __typename ... on Asset {
    assetMaterializations(limit: 5) { partition metadataEntries { label ... on BoolMetadataEntry { boolValue } } }
} } }
"""


@pytest.fixture
def dagster(tmp_path: Path, postgres: Server):
    """The real daemon and webserver over a root on local disk, the instance on a real PostgreSQL.

    As deployed (deploy/helm/values.yaml); test_s3_restart and test_nearline run on SQLite, so both stay covered.
    """
    root = tmp_path / "root"
    with running_dagster(tmp_path, root, postgres=postgres) as graphql:
        yield make_layout(root, images=90, shards=3), graphql, tmp_path


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
    assert (status["numPartitionsTargeted"], status["numPartitionsMaterialized"], status["numPartitionsFailed"]) == (
        3,
        3,
        0,
    )

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
    answer = Searcher(layout, MODEL, cache_dir=str(logs / "cache")).search_image(make_fetcher()(shard.uris[3]), k=5)
    assert answer.version == "v1" and answer.hits[0].image_id == int(shard.image_ids[3])
