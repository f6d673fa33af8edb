"""The real thing, as deployed: daemon and webserver on loopback, runs in PostgreSQL, the root in a real S3 server
that restarts in the middle of the backfill; a version registered, the backfill followed through GraphQL, every
image embedded exactly once, the index published and searched from S3, nothing written to local disk."""

import signal
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance

from backfill.images import make_fetcher
from backfill.manifest import read_shard
from backfill.publish import read_pointer
from backfill.search import Searcher
from backfill.verify import verify_version
from harness.chaos import retries
from harness.local_instance import wait_for
from harness.local_postgres import Server
from harness.local_s3 import LocalS3
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

OUTAGE_S = 8


@pytest.fixture
def s3(tmp_path: Path, monkeypatch):
    server = LocalS3(tmp_path / "s3").start()
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    # botocore's own retries would ride out a short outage unseen; two attempts make Dagster's retries do the work
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    try:
        yield server
    finally:
        server.stop()


def test_register_version_backfill_through_an_s3_restart_publish_search(tmp_path: Path, postgres: Server, s3):
    """One daemon start and one backfill for both what the loop does and what an S3 restart costs it (each was a
    test of its own; the near-line test covers SQLite)."""
    root = s3.make_bucket("loop") + "/root"
    layout = make_layout(root, images=96, shards=3)
    embeddings = f"loop/root/embeddings/{MODEL}/v1"
    with running_dagster(tmp_path, root, postgres=postgres, BACKFILL_CHUNK_SIZE="8", BACKFILL_BATCH_SIZE="8") as gql:
        register_tiny(layout, "v1")

        def chunks_committed() -> int:
            fs = s3.filesystem()
            return len([k for k in fs.find(embeddings) if "/rows-" in k]) if fs.exists(embeddings) else 0

        wait_for(lambda: chunks_committed() > 0, timeout=240, interval=0.5, what=f"a first chunk (logs in {tmp_path})")
        s3.stop(signal.SIGKILL)  # the store vanishes mid-write, as a crashed gateway does
        down = time.monotonic()
        instance = DagsterInstance.from_config(str(tmp_path / "dagster_home"))
        # down until a partition has failed for it (a step between two S3 calls for longer than a fixed outage
        # would see nothing, and the test would prove nothing), and at least OUTAGE_S
        wait_for(
            lambda: sum(retries(instance, "v1")) >= 1,
            timeout=180,
            interval=0.5,
            what=f"a partition failing while S3 is down (logs in {tmp_path})",
        )
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
        s3.start()

        def completed_backfill():
            for b in gql(BACKFILLS)["partitionBackfillsOrError"]["results"]:
                assert b["status"] not in ("FAILED", "CANCELED"), b
                if b["status"] == "COMPLETED_SUCCESS":
                    return b
            return None

        backfill = wait_for(completed_backfill, timeout=400, interval=2, what=f"the backfill (logs in {tmp_path})")
        (status,) = backfill["assetBackfillData"]["assetBackfillStatuses"]
        assert status["assetKey"]["path"] == ["image_embeddings"]
        counts = (status["numPartitionsTargeted"], status["numPartitionsMaterialized"], status["numPartitionsFailed"])
        assert counts == (3, 3, 0)

        def published():
            asset = gql(PUBLISHED)["assetOrError"]
            if asset["__typename"] != "Asset":
                return None
            for m in asset["assetMaterializations"]:
                flags = {e["label"]: e.get("boolValue") for e in m["metadataEntries"]}
                if m["partition"] == "v1" and flags.get("published"):
                    return m
            return None

        wait_for(published, timeout=240, interval=2, what=f"search_index v1 published (logs in {tmp_path})")
        step_retries, run_retries = retries(instance, "v1")

    pointer = read_pointer(layout, MODEL)
    assert pointer["version"] == "v1" and pointer["vectors"] == 96
    result = verify_version(layout, MODEL, "v1")
    assert (result.lost, result.duplicated, result.rejects, result.index_mismatch) == (0, 0, 0, 0), result
    assert result.pointer_ok and not result.problems, result
    assert result.rows == 96
    print(f"S3 restart: {step_retries} steps put up for retry, {run_retries} runs retried; {result}")
    assert step_retries + run_retries >= 1, "the outage hit no partition: the test proved nothing"

    shard = read_shard(layout, "shard-00001")
    answer = Searcher(layout, MODEL, cache_dir=str(tmp_path / "cache")).search_image(make_fetcher()(shard.uris[3]), k=5)
    assert answer.version == "v1" and answer.hits[0].image_id == int(shard.image_ids[3])
    assert not (tmp_path / "root").exists(), "an s3:// root must not write to local disk"
