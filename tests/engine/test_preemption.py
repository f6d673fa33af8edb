"""A preemption notice stops a partition at a chunk boundary; the retry resumes after the committed chunks."""

import dataclasses
import os
import signal

import numpy as np
import pytest

from backfill.config import EmbedConfig
from backfill.embed import embed_shard, is_chunk, load_embeddings
from backfill.errors import Preempted, RetryableError
from backfill.hooks import WorkLog
from backfill.preemption import StopSignal, sigterm_notice
from backfill.runtime import load_model
from tests.conftest import MODEL

CONFIG = EmbedConfig(batch_size=2, chunk_size=6, fetch_workers=2, decode_workers=1, torch_threads=1)
SHARD = "shard-00002"  # 20 rows: chunks of 6, 6, 6, 2


def committed(layout):
    return [n for n in layout.store.ls(layout.embeddings(MODEL, "v1", SHARD)) if is_chunk(n)]


def reference(layout, model):
    embed_shard(layout, SHARD, model, CONFIG)
    result = load_embeddings(layout, MODEL, "v1", SHARD)
    layout.store.rm(layout.embeddings(MODEL, "v1", SHARD), recursive=True)
    return result


def test_preempted_is_retryable():
    assert issubclass(Preempted, RetryableError)


def test_notice_between_chunks_stops_before_the_next(registered):
    layout, card = registered
    model = load_model(layout, card)
    stop = StopSignal()
    with pytest.raises(Preempted, match="before rows 6-12"):
        embed_shard(layout, SHARD, model, CONFIG, stop=stop, on_chunk_committed=lambda chunk: stop.set("test"))
    assert committed(layout) == ["rows-000000000000-000000000006.parquet"]


def test_notice_mid_chunk_with_grace_commits_the_chunk_in_hand(registered):
    layout, card = registered
    model = load_model(layout, card)
    ref_ids, ref_vecs, _ = reference(layout, model)
    stop = StopSignal()

    def notice_once_one_chunk_is_committed(n):
        if n and len(committed(layout)) == 1:
            stop.set("test")

    with pytest.raises(Preempted, match=r"before rows 12-18; 2 chunks committed now"):
        embed_shard(layout, SHARD, model, CONFIG, stop=stop, on_batch=notice_once_one_chunk_is_committed)
    assert len(committed(layout)) == 2  # the chunk in hand was finished, nothing after it started
    resumed = embed_shard(layout, SHARD, model, CONFIG)
    assert resumed.chunks_resumed == 2 and resumed.images_embedded_now == 8
    ids, vecs, _ = load_embeddings(layout, MODEL, "v1", SHARD)
    assert np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-3)


def test_notice_mid_chunk_without_grace_abandons_the_chunk(registered):
    layout, card = registered
    model = load_model(layout, card)
    stop = StopSignal()
    no_grace = EmbedConfig(batch_size=2, chunk_size=6, fetch_workers=2, decode_workers=1, torch_threads=1, grace_s=0)
    embedded = []

    def notice_in_second_chunk(n):
        embedded.append(n)
        if sum(embedded) == 8:  # 6 rows committed, 2 into the second chunk
            stop.set("test")

    with pytest.raises(Preempted, match="in rows 6-12: .* chunk abandoned"):
        embed_shard(layout, SHARD, model, no_grace, stop=stop, on_batch=notice_in_second_chunk)
    assert committed(layout) == ["rows-000000000000-000000000006.parquet"]
    assert sum(embedded) == 8  # wasted work: the 2 rows of the abandoned chunk, at most one chunk


def test_sigterm_sets_the_notice_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_notice() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set() and stop.reason == "SIGTERM"
        assert stop.seconds_left(30) <= 30
    assert signal.getsignal(signal.SIGTERM) is before


class Crash(Exception):
    """A kill of the process at a chosen point (raised from a hook: nothing after it runs)."""


def crash_at(images: int):
    """An on_batch hook that kills the run once `images` images were embedded (faiss big_batch_search's crash_at)."""
    seen = []

    def on_batch(n: int) -> None:
        seen.append(n)
        if sum(seen) >= images:
            raise Crash(f"killed after {sum(seen)} images")

    return on_batch


def test_work_log_lines_are_one_append_per_batch(tmp_path):
    path = tmp_path / "work.log"
    log = WorkLog(str(path), "v1", "shard-00002")
    log(2)
    log(1)
    assert path.read_bytes() == f"{os.getpid()} v1 shard-00002 2\n{os.getpid()} v1 shard-00002 1\n".encode()


def test_a_run_killed_halfway_resumes_to_the_uninterrupted_result(registered, tmp_path):
    layout, card = registered
    model = load_model(layout, card)
    ref_ids, ref_vecs, _ = reference(layout, model)
    work_log = tmp_path / "work.log"
    config = dataclasses.replace(CONFIG, work_log=str(work_log))
    with pytest.raises(Crash):
        embed_shard(layout, SHARD, model, config, on_batch=crash_at(10))  # in the second chunk of 6 rows
    kept = committed(layout)
    assert kept == ["rows-000000000000-000000000006.parquet"]  # the chunk in hand died with the process
    logged_by_killed = sum(int(line.split()[-1]) for line in work_log.read_text().splitlines())
    assert logged_by_killed == 10  # the work log counts the batch the kill came in
    resumed = embed_shard(layout, SHARD, model, config)
    assert resumed.chunks_resumed == 1 and resumed.images_embedded_now == 14
    ids, vecs, _ = load_embeddings(layout, MODEL, "v1", SHARD)
    assert np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-3)
    lines = [line.split() for line in work_log.read_text().splitlines()]
    assert {(v, s) for _, v, s, _ in lines} == {("v1", SHARD)}
    wasted = sum(int(n) for *_, n in lines) - 20
    assert wasted == 4 and wasted <= CONFIG.chunk_size  # the rows of the abandoned chunk, never more than one chunk
