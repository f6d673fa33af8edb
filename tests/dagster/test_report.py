"""backfill_plan and backfill_report on a small backfill materialized in process, checked against the records."""

from dagster import AssetKey, RunsFilter, instance_for_test, materialize

import assets.embeddings as embeddings_module
from assets.report import backfill_plan, backfill_report
from backfill.calibrate import MAX_SLOTS
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
    assert (
        plan_meta["calibration_slots"] == read_plan(layout, MODEL, "v1")["calibration_slots"] == min(slots, MAX_SLOTS)
    )
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


def test_earlier_runs_give_the_start_up_beyond_their_body_and_their_model_load():
    from dagster import DagsterEvent, DagsterEventType, MaterializeResult, asset

    from ops.runs import VERSION_TAG, measured_startup

    @asset
    def partition() -> MaterializeResult:
        return MaterializeResult(metadata={"wall_s": 0.5, "model_load_s": 0.25})

    with instance_for_test() as instance:
        assert measured_startup(instance) is None  # no run yet: the plan probes instead
        run_id = materialize([partition], instance=instance, tags={VERSION_TAG: "v1"}).run_id
        in_process = run_phases(instance, run_id)
        assert set(in_process) == {"to_step", "step", "finish", "body", "model_load"}
        startup = measured_startup(instance)  # no worker launched: the launch counts 0
        step_start = instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)[0].timestamp
        job_name = instance.get_run_by_id(run_id).job_name
        starting = DagsterEvent(event_type_value=DagsterEventType.RUN_STARTING.value, job_name=job_name)
        instance.report_dagster_event(starting, run_id, timestamp=step_start - 7.5)  # as a launched run has
        phases = run_phases(instance, run_id)  # (the event makes the run STARTING again: measured before)
    # the worker's launch then the step process's start
    assert abs(phases["launch"] + phases["to_step"] - 7.5) < 1e-3 and phases["step"] >= 0 and phases["finish"] >= 0
    expected = sum(in_process[p] for p in ("to_step", "step", "finish")) - 0.5 - 0.25
    assert abs(startup.seconds - expected) < 1e-3 and startup.add_model_load  # the planned version's load goes in
    assert startup.source == "median of 1 earlier runs on this instance, their model's load taken out"


def test_the_queue_hand_off_is_half_the_instance_dequeue_interval():
    from backfill.calibrate import local_pod
    from backfill.plan import Startup
    from ops.startup import with_handoff

    with instance_for_test(
        overrides={"run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                                       "config": {"dequeue_interval_seconds": 2}}}
    ) as instance:  # fmt: skip
        startup = with_handoff(Startup(9.0, "median of 3 earlier runs"), instance)
    assert startup.seconds == 10.0 and "hand-off 1.0 s" in startup.source
    assert with_handoff(Startup(9.0, "x"), None).seconds == 9.0  # no instance: no queue
    # the calibration's model load is added to a probe, never to a figure measured on whole runs
    probe = Startup(4.0, "a probe now", add_model_load=True)
    assert local_pod("cpu", 2, probe, model_load_s=1.5).startup_s == 5.5
    assert local_pod("cpu", 2, Startup(9.0, "median of 3 earlier runs"), model_load_s=1.5).startup_s == 9.0
    assert "model's load not counted" in local_pod("cpu", 2, probe, model_load_s=None).startup_source


def test_a_plan_on_an_instance_without_runs_launches_probe_runs(registered, capsys, monkeypatch):
    from backfill.cli import main
    from backfill.plan import Startup
    from ops.startup import launched_startup

    real = launched_startup(1)  # the project's code location, its launcher and executor, on a scratch instance
    assert real.seconds > 0 and real.add_model_load
    assert real.source.startswith("a probe now: 1 run(s) at once launched on a scratch instance, median run ")
    assert "to_step" in real.source and "finish" in real.source
    layout, _ = registered
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setattr("ops.startup.launched_startup", lambda slots: Startup(3.0, f"a probe now: {slots}", True))
    assert main(["--root", layout.store.root, "plan", "v1", "--images", "8", "--pods", "2"]) == 0
    captured = capsys.readouterr()
    assert "(a probe now: 2, + the model's load" in captured.out
    assert "timing a partition's start-up (2 probe runs at once" in captured.err


def _pids(path):
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_a_probe_run_that_fails_is_named(tmp_path, monkeypatch):
    import pytest

    from backfill.errors import ConfigError
    from ops.startup import launched_startup

    monkeypatch.setenv("PROBE_FIXTURE_MODE", "fail")
    monkeypatch.setenv("PROBE_FIXTURE_PID", str(tmp_path / "pids"))
    with pytest.raises(ConfigError, match=r"start-up probe: run \S+ FAILURE: .*no torch here"):
        launched_startup(1, module="tests.dagster.startup_probe_fixture")
    with pytest.raises(ConfigError, match="run slots 0"):
        launched_startup(0)
    with pytest.raises(ConfigError, match="code location no_such_module failed to load"):
        launched_startup(1, module="no_such_module")


def test_a_probe_run_that_hangs_is_stopped_and_named(tmp_path, monkeypatch):
    import os

    import pytest

    from backfill.errors import ConfigError
    from ops.startup import launched_startup

    monkeypatch.setenv("PROBE_FIXTURE_MODE", "hang")
    monkeypatch.setenv("PROBE_FIXTURE_PID", str(tmp_path / "pids"))
    with pytest.raises(ConfigError, match="1 of 1 run.s. still going after 40 s"):
        launched_startup(1, timeout_s=40.0, module="tests.dagster.startup_probe_fixture")
    (pid,) = _pids(tmp_path / "pids")  # the step began, and its process is gone: not left behind
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
