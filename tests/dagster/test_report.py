"""backfill_plan and backfill_report on a small backfill materialized in process, checked against the records."""

from dagster import AssetKey, RunsFilter, instance_for_test, materialize

import assets.embeddings as embeddings_module
from assets.report import backfill_plan, backfill_report
from backfill.embed import MARKER
from backfill.errors import Preempted
from backfill.finalise import read_marker
from backfill.report import read_plan
from ops.runs import local_slots, run_phases
from tests.conftest import MODEL
from tests.dagster.test_assets import add_partitions, embed_one, latest_metadata, resources


def report(instance, layout):
    return materialize([backfill_report], partition_key="v1", instance=instance, resources=resources(layout))


def test_every_partition_carries_its_stage_seconds_queue_wait_and_attempt(registered):
    layout, _ = registered
    with instance_for_test() as instance:
        add_partitions(instance, layout)
        assert embed_one(instance, layout, "shard-00000").success
        meta = latest_metadata(instance, "image_embeddings", "v1|shard-00000")
    for stage in ("wait_batch", "forward", "write_wait", "other", "writer_write"):
        assert isinstance(meta[f"stage_{stage}_s"], float)
    main = sum(meta[f"stage_{s}_s"] for s in ("wait_batch", "forward", "write_wait", "other"))
    assert abs(main - meta["wall_s"]) < 0.01  # "other" is the rest of the wall time
    assert meta["attempt"] == 1 and meta["run_attempt"] == 1 and meta["embedded_now"] == 20
    assert meta["queue_wait_s"] >= 0 and meta["step_wait_s"] >= 0


def test_report_numbers_match_the_markers_and_the_run_records(registered, monkeypatch):
    layout, _ = registered
    real, calls = embeddings_module.embed_shard, []

    def preempted_once(*args, **kwargs):
        # the first attempt at shard-00001 is preempted with a chunk in hand: the retry redoes that chunk
        calls.append(args[1])
        if args[1] == "shard-00001" and calls.count("shard-00001") == 1:
            raise Preempted("stopped (SIGTERM) in rows 0-8: finishing needed ~9s, 1s of grace left; chunk abandoned")
        return real(*args, **kwargs)

    monkeypatch.setattr(embeddings_module, "embed_shard", preempted_once)
    with instance_for_test() as instance:
        shards = add_partitions(instance, layout)
        for shard in shards:
            assert embed_one(instance, layout, shard).success
        plan = materialize([backfill_plan], partition_key="v1", instance=instance, resources=resources(layout))
        assert plan.success
        slots = local_slots(instance)
        assert report(instance, layout).success
        meta = latest_metadata(instance, "backfill_report", "v1")
        plan_meta = latest_metadata(instance, "backfill_plan", "v1")
        records = instance.get_run_records(RunsFilter(tags={"dagster/partition/model_version": "v1"}))
        rates = sorted(latest_metadata(instance, "image_embeddings", f"v1|{s}")["images_per_s"] for s in shards)
        forward = sum(latest_metadata(instance, "image_embeddings", f"v1|{s}")["stage_forward_s"] for s in shards)
        phases = [run_phases(instance, r.dagster_run.run_id) for r in records]

    markers = [read_marker(layout, layout.embeddings(MODEL, "v1", s)) for s in shards]
    assert meta["shards"] == meta["shards_complete"] == 3
    assert meta["images"] == sum(m.images for m in markers) == 60 and meta["rejects"] == 0
    assert meta["runs"] == len(records) == 3 and meta["run_retries"] == 0
    assert meta["step_retries"] == 1 and meta["preemptions"] == 1 and meta["chunks_redone"] == 1
    busy = sum(r.end_time - r.start_time for r in records) / 3600
    assert abs(meta["pod_hours"] - busy) < 1e-4 and meta["gpu_hours"] == 0 and meta["spot_share"] == 0
    wall = max(r.end_time for r in records) - min(r.create_timestamp.timestamp() for r in records)
    assert abs(meta["wall_s"] - wall) < 0.1
    assert meta["img_s_min"] == round(rates[0], 1) and meta["img_s_max"] == round(rates[-1], 1)
    assert abs(meta["stage_forward_s"] - forward) < 0.01
    # each run's timeline holds its partition's own wall time inside its step
    assert all(0 < p["body"] <= p["step"] for p in phases) and len(phases) == 3
    # the plan made before is beside the actuals, and was saved where the report found it
    assert meta["plan_wall_s"] == plan_meta["wall_s"] == round(read_plan(layout, MODEL, "v1")["wall_s"], 1)
    assert plan_meta["embedding_bytes"] == 60 * (16 * 2 + 8) and plan_meta["pods"] == slots
    # the plan's start-up per partition was measured on this instance's three embedding runs
    assert "median of 3 earlier runs on this instance" in plan_meta["plan"]
    assert "| images | 60 (60 embedded, 0 rejected) |" in meta["report"]
    assert "chunks redone" in meta["report"] and "img/s per partition" in meta["report"]
    assert all(layout.store.exists(f"{layout.embeddings(MODEL, 'v1', s)}/{MARKER}") for s in shards)


def test_report_of_a_version_with_nothing_embedded_yet(registered):
    layout, _ = registered
    with instance_for_test() as instance:
        add_partitions(instance, layout)
        assert report(instance, layout).success
        meta = latest_metadata(instance, "backfill_report", "v1")
        assert instance.get_latest_materialization_event(AssetKey("backfill_report")) is not None
    assert meta["shards"] == 3 and meta["shards_complete"] == 0 and meta["runs"] == 0 and "cost" not in meta
    assert "| shards complete | 0 / 3 |" in meta["report"]


def test_the_plan_never_blocks_a_backfill_and_the_report_follows_the_embeddings():
    from ops.definitions import defs

    graph = defs().resolve_asset_graph()
    plan, report_node = graph.get(AssetKey("backfill_plan")), graph.get(AssetKey("backfill_report"))
    assert plan.parent_keys == {AssetKey("model_version")} and plan.child_keys == set()
    assert report_node.parent_keys == {AssetKey("image_embeddings")} and report_node.child_keys == set()
    assert plan.automation_condition is None and report_node.automation_condition is None  # materialized by hand


def test_a_launched_plan_run_measures_its_own_start_up_an_in_process_one_does_not():
    from dagster import DagsterEvent, DagsterEventType, asset

    from ops.runs import run_phases
    from ops.startup import own_run_startup

    @asset
    def nothing() -> None:
        return None

    with instance_for_test() as instance:
        run_id = materialize([nothing], instance=instance).run_id
        assert own_run_startup(instance, run_id) is None  # executed in process: no worker was started
        assert set(run_phases(instance, run_id)) == {"to_step", "step", "finish"}
        step_start = instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)[0].timestamp
        job_name = instance.get_run_by_id(run_id).job_name
        starting = DagsterEvent(event_type_value=DagsterEventType.RUN_STARTING.value, job_name=job_name)
        instance.report_dagster_event(starting, run_id, timestamp=step_start - 7.5)
        startup = own_run_startup(instance, run_id)
        phases = run_phases(instance, run_id)
    assert abs(startup.seconds - 7.5) < 1e-3 and startup.add_model_load and "own run" in startup.source
    # the same events, as the phases of the run's timeline (the worker's launch then the step process's start)
    assert abs(phases["launch"] + phases["to_step"] - 7.5) < 1e-3 and phases["step"] >= 0 and phases["finish"] >= 0


def test_the_start_up_probe_times_both_process_starts_and_names_a_failure(monkeypatch):
    import pytest

    import ops.startup as runs
    from backfill.calibrate import local_pod
    from backfill.errors import ConfigError
    from backfill.plan import Startup

    monkeypatch.setattr(runs, "RUN_WORKER_IMPORTS", "import time; time.sleep(0.3)")
    monkeypatch.setattr(runs, "STEP_IMPORTS", "import time; time.sleep(0.2)")
    startup = runs.probe_startup(2)
    assert startup.seconds >= 0.5 and startup.add_model_load
    assert startup.source.startswith("probe now, 2 at once: run workers' ") and "their steps'" in startup.source
    # the calibration's model load is added to a probe, never to a figure measured on whole runs
    assert local_pod("cpu", 2, startup, model_load_s=1.5).startup_s == startup.seconds + 1.5
    assert local_pod("cpu", 2, Startup(9.0, "median of 3 earlier runs"), model_load_s=1.5).startup_s == 9.0
    assert "model's load not counted" in local_pod("cpu", 2, startup, model_load_s=None).startup_source
    monkeypatch.setattr(runs, "STEP_IMPORTS", "import sys; sys.exit('no torch here')")
    with pytest.raises(ConfigError, match=r"import sys.*failed \(1\): no torch here"):
        runs.probe_startup(1)
    with pytest.raises(ConfigError, match="run slots 0"):
        runs.probe_startup(0)


def test_a_plan_on_an_instance_without_runs_probes_the_start_up(registered, capsys, monkeypatch):
    from backfill.cli import main
    from ops.startup import probe_startup

    real = probe_startup(1)  # the imports a run worker and a step process really make: they must load
    assert real.seconds > 0 and real.source.startswith("probe now, 1 at once: run workers' ")
    # an in-process deployment has no step process to wait for
    monkeypatch.setenv("BACKFILL_DEPLOYMENT", "local-in-process")
    monkeypatch.setattr("ops.startup.RUN_WORKER_IMPORTS", "pass")
    assert "their steps'" not in probe_startup(2).source
    monkeypatch.delenv("BACKFILL_DEPLOYMENT")
    layout, _ = registered
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setattr("ops.startup.STEP_IMPORTS", "pass")  # the rest of the CLI's path, without the cost
    assert main(["--root", layout.store.root, "plan", "v1", "--images", "8", "--pods", "2"]) == 0
    out = capsys.readouterr().out
    assert "(probe now, 2 at once: run workers'" in out and "+ the model's load" in out


def test_a_probe_that_hangs_is_stopped_and_named(monkeypatch):
    import subprocess

    import pytest

    import ops.startup as startup
    from backfill.errors import ConfigError

    monkeypatch.setattr(startup, "RUN_WORKER_IMPORTS", "import time; time.sleep(61.25)")
    with pytest.raises(ConfigError, match="still running after 1 s"):
        startup.probe_startup(2, timeout_s=1.0)
    # both interpreters were killed, not left behind
    assert subprocess.run(["pgrep", "-f", "time.sleep.61.25"], capture_output=True).returncode == 1
