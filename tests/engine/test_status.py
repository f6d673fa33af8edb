"""backfill status VERSION: progress from committed chunks and markers, runs when known, the rate and the ETA."""

import pytest

from backfill.cli import main
from backfill.config import EmbedConfig
from backfill.embed import embed_shard
from backfill.report import RunFacts, read_plan
from backfill.runtime import load_model
from backfill.status import Progress, describe, progress
from tests.conftest import MODEL

CONFIG = EmbedConfig(batch_size=8, chunk_size=8)
ROWS = {"shard-00000": 20, "shard-00001": 20, "shard-00002": 20}


class Killed(Exception):
    pass


@pytest.fixture
def half_done(registered):
    """shard-00000 complete, shard-00001 killed after its first chunk, shard-00002 not started."""
    layout, card = registered
    model = load_model(layout, card)
    embed_shard(layout, "shard-00000", model, CONFIG)

    def kill(_):
        raise Killed

    with pytest.raises(Killed):
        embed_shard(layout, "shard-00001", model, CONFIG, on_chunk_committed=kill)
    return layout


def test_progress_from_storage_alone(half_done):
    p = progress(half_done, MODEL, "v1", ROWS, runs=None, now=0.0)
    assert (p.shards, p.done, p.running, p.left) == (3, 1, [("shard-00001", 8, 20)], 1)
    assert p.images == 60 and p.committed == 28 and p.active
    assert p.first_s is not None and p.last_s >= p.first_s  # from the chunks' modification times


def test_runs_say_which_shards_are_running(half_done):
    runs = [RunFacts("shard-00002", "STARTED", created=100.0, started=101.0, ended=None, pool="")]
    p = progress(half_done, MODEL, "v1", ROWS, runs=runs, now=0.0)
    # shard-00001's run is not running: it is left (its committed chunk counts), shard-00002 runs
    assert p.done == 1 and p.running == [("shard-00002", 0, 20)] and p.left == 1 and p.first_s == 100.0


def test_rate_and_eta():
    p = Progress("refcnn", "v1", shards=3, done=1, images=60, committed=28, first_s=0.0, last_s=10.0, active=True)
    assert p.img_s(now=14.0) == pytest.approx(2.0) and p.eta_s(now=14.0) == pytest.approx(16.0)
    assert "28/60 images committed (47%); 2.0 img/s, ETA 16.0 s" in describe(p, now=14.0)
    done = Progress("refcnn", "v1", shards=3, done=3, images=60, committed=60, first_s=0.0, last_s=30.0)
    assert "3/3 shards done" in describe(done, now=99.0) and "complete in 30.0 s (2.0 img/s)" in describe(done, 99.0)


def test_cli_status_and_plan(half_done, capsys, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    root = half_done.store.root
    assert main(["--root", root, "status", "v1"]) == 0
    out = capsys.readouterr().out
    assert "refcnn v1: 1/3 shards done, 1 running, 1 left; 28/60 images committed" in out and "from storage only" in out
    # (without --startup-s a probe times process starts: tests/dagster/test_report.py)
    assert main(["--root", root, "plan", "v1", "--images", "16", "--pods", "2", "--startup-s", "3"]) == 0
    out = capsys.readouterr().out
    assert "calibration:" in out and "16 sample images on cpu" in out and "wall time:" in out
    # the two local run slots were calibrated as they will run: side by side, and the saved plan says so
    assert "2 slots side by side" in out and "warm-up:" in out
    assert read_plan(half_done, MODEL, "v1")["calibration_slots"] == 2
    assert "GPU-hours:" in out and "saved to" in out
    assert main(["--root", root, "plan", "v1", "--img-s", "10", "--pods", "1", "--startup-s", "12.5"]) == 0
    out = capsys.readouterr().out
    assert "calibration" not in out and "img/s per pod:" in out and "10.0" in out
    assert "12.5 s (--startup-s)" in out
    assert main(["--root", root, "plan", "v1", "--img-s", "10", "--startup-s", "-1"]) == 2
    assert "--startup-s -1.0: a start-up cannot be negative" in capsys.readouterr().err
    # a GPU pool planned from this CPU-only process: refused, saying how to plan it
    assert main(["--root", root, "plan", "v1", "--pool", "gpu-spot", "--images", "8"]) == 2
    err = capsys.readouterr().err
    assert "calibrates on cuda, but CUDA is not available" in err and "(--img-s)" in err
    assert main(["--root", root, "plan", "v1", "--pool", "gpu-spot", "--img-s", "5000"]) == 0
    out = capsys.readouterr().out
    assert "gpu-spot: 32 pods of 8 CPUs, 1 GPUs (cuda)" in out and "cost on spot:" in out


def test_cli_status_reads_the_dagster_instance_when_there_is_one(half_done, tmp_path, capsys, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert main(["--root", half_done.store.root, "status", "v1"]) == 0
    out = capsys.readouterr().out
    # no runs in that instance: shard-00001's committed chunk counts, but nothing is running
    assert "1/3 shards done, 0 running, 2 left; 28/60 images committed" in out and "(nothing running now)" in out
    assert f"runs from the Dagster instance in {home}" in out
