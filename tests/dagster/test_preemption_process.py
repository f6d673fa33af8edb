"""Real step processes under the multiprocess executor: SIGTERM and SIGKILL both end in a retry that resumes."""

import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterInstance, build_reconstructable_job, execute_job, instance_for_test

from backfill.embed import MARKER, load_embeddings
from backfill.manifest import list_shards, read_shard
from harness.local_instance import REPO
from tests.conftest import MODEL, make_layout, register_tiny

PARTITION = "v1|shard-00000"
SHARD = "shard-00000"


def embed_job():
    from ops.definitions import defs

    return defs().get_job_def("embed_job")


ROWS = 120


def reconstructable_embed_job():
    # the step process imports this module again, from the repository root
    return build_reconstructable_job(__name__, "embed_job", reconstructor_working_directory=str(REPO))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    layout = make_layout(tmp_path / "root", images=ROWS, shards=1)  # enough rows to be interrupted mid-shard
    register_tiny(layout, "v1")
    work_log = tmp_path / "work.log"
    # the step process reads its settings from the environment, as a pod does
    monkeypatch.setenv("BACKFILL_ROOT", layout.store.root)
    monkeypatch.setenv("BACKFILL_CHUNK_SIZE", "4")
    monkeypatch.setenv("BACKFILL_BATCH_SIZE", "2")
    monkeypatch.setenv("BACKFILL_WORK_LOG", str(work_log))
    return layout, work_log


def run_with_signal(instance: DagsterInstance, work_log: Path, signo: int, after_images: int):
    """Execute the partition; once `after_images` images were embedded, send `signo` to the step process."""
    sent = []

    def killer():
        # the work log names the process that embeds: that is the step process
        while not sent:
            lines = work_log.read_text().splitlines() if work_log.exists() else []
            if sum(int(line.split()[-1]) for line in lines) >= after_images:
                pid = int(lines[-1].split()[0])
                os.kill(pid, signo)
                sent.append(pid)
            threading.Event().wait(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = execute_job(reconstructable_embed_job(), instance=instance, tags={"dagster/partition": PARTITION}, raise_on_error=False)
    thread.join(timeout=5)
    return result, sent


def events(instance, run_id):
    return [r.event_log_entry.dagster_event for r in instance.get_records_for_run(run_id).records if r.event_log_entry.dagster_event]


def images_embedded(work_log: Path) -> int:
    return sum(int(line.split()[-1]) for line in work_log.read_text().splitlines())


def assert_exactly_once(layout):
    ids, _, valid = load_embeddings(layout, MODEL, "v1", "shard-00000")
    assert np.array_equal(ids, read_shard(layout, "shard-00000").image_ids) and valid.all()
    assert layout.store.exists(f"{layout.embeddings(MODEL, 'v1', 'shard-00000')}/{MARKER}")


def test_sigterm_marks_the_step_up_for_retry_and_the_retry_resumes(setup):
    layout, work_log = setup
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", list_shards(layout))
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, sent = run_with_signal(instance, work_log, signal.SIGTERM, after_images=5)
        assert sent, "the step process was never found"
        assert result.success
        kinds = [e.event_type_value for e in events(instance, result.run_id)]
        assert "STEP_UP_FOR_RETRY" in kinds and kinds.count("STEP_START") + kinds.count("STEP_RESTARTED") == 2
        assert "STEP_FAILURE" not in kinds
        assert_exactly_once(layout)
        # with 20 s of grace the chunk in hand was committed: nothing was embedded twice
        assert images_embedded(work_log) == ROWS


def test_sigkill_is_retried_by_the_policy_and_resumes_from_committed_chunks(setup):
    layout, work_log = setup
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shard", list_shards(layout))
        instance.add_dynamic_partitions("model_version", ["v1"])
        result, sent = run_with_signal(instance, work_log, signal.SIGKILL, after_images=7)
        assert sent
        # the executor sees the child die without a result and applies the RetryPolicy
        assert result.success
        kinds = [e.event_type_value for e in events(instance, result.run_id)]
        assert "STEP_RESTARTED" in kinds
        resumed = [e for e in events(instance, result.run_id) if e.event_type_value == "ASSET_MATERIALIZATION"]
        meta = resumed[0].event_specific_data.materialization.metadata
        assert meta["chunks_resumed"].value >= 1  # the killed attempt's committed chunks were kept
        assert_exactly_once(layout)
        # a killed attempt wastes at most the chunk it was in (4 rows) on top of the shard itself
        assert images_embedded(work_log) - ROWS <= 4
