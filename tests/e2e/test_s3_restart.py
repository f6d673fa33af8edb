"""The loop over a real S3 server that restarts in the middle of the backfill: partitions fail, retry and
finish, exactly once; the published index is searched from S3 and nothing is written to local disk."""

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
from harness.local_s3 import LocalS3
from tests.conftest import MODEL, make_layout, register_tiny
from tests.e2e.conftest import running_dagster

pytestmark = pytest.mark.e2e

OUTAGE_S = 8


def test_backfill_survives_an_s3_restart(tmp_path: Path, monkeypatch):
    server = LocalS3(tmp_path / "s3").start()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        # botocore's own retries would ride out a short outage unseen; two attempts make Dagster's retries do the work
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        root = server.make_bucket("restart") + "/root"
        layout = make_layout(root, images=96, shards=3)
        embeddings = f"restart/root/embeddings/{MODEL}/v1"
        with running_dagster(tmp_path, root, BACKFILL_CHUNK_SIZE="8", BACKFILL_BATCH_SIZE="8"):
            register_tiny(layout, "v1")

            def chunks_committed() -> int:
                fs = server.filesystem()
                return len([k for k in fs.find(embeddings) if "/rows-" in k]) if fs.exists(embeddings) else 0

            wait_for(
                lambda: chunks_committed() > 0,
                timeout=240,
                interval=0.5,
                what=f"a first committed chunk (logs in {tmp_path})",
            )
            server.stop(signal.SIGKILL)  # the store vanishes mid-write, as a crashed gateway does
            time.sleep(OUTAGE_S)
            server.start()

            def published():
                pointer = read_pointer(layout, MODEL)
                return pointer if pointer and pointer["version"] == "v1" else None

            wait_for(published, timeout=400, interval=2, what=f"v1 published after the restart (logs in {tmp_path})")
            step_retries, run_retries = retries(DagsterInstance.from_config(str(tmp_path / "dagster_home")), "v1")

        result = verify_version(layout, MODEL, "v1")
        assert (result.lost, result.duplicated, result.rejects, result.index_mismatch) == (0, 0, 0, 0), result
        assert result.pointer_ok and not result.problems, result
        assert result.rows == 96
        print(f"S3 restart: {step_retries} steps put up for retry, {run_retries} runs retried; {result}")
        assert step_retries + run_retries >= 1, "the outage hit no partition: the test proved nothing"

        shard = read_shard(layout, "shard-00001")
        searcher = Searcher(layout, MODEL, cache_dir=str(tmp_path / "cache"))
        answer = searcher.search_image(make_fetcher()(shard.uris[3]), k=5)
        assert answer.version == "v1" and answer.hits[0].image_id == int(shard.image_ids[3])
        assert not (tmp_path / "root").exists(), "an s3:// root must not write to local disk"
    finally:
        server.stop()
