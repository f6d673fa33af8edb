"""faiss_index as steps: plan, parallel add groups, finish; values between them go through the backfill root."""

from dagster import build_input_context, build_output_context, instance_for_test, materialize

import backfill.index
from assets.index import INDEX_STEP_OPS, faiss_index, search_index
from assets.io import IO_FOLDER, StoreIOManager
from backfill.storage import Store
from tests.conftest import MODEL
from tests.dagster.test_assets import embed_all, latest_metadata, resources


def add_steps(result) -> set[str]:
    return {e.step_key for e in result.all_events if e.is_step_success and ".faiss_index_add[" in e.step_key}


def test_a_build_adds_its_shards_in_one_step_per_group_and_a_retry_reuses_committed_parts(registered, monkeypatch):
    layout, _ = registered  # 3 shards: 3 groups under add_parallelism 4 (with groups of 1 vector allowed)
    real, failed = backfill.index.add_part, []

    def add_part_failing_once(layout, work, shard, reader):
        if shard == "shard-00001" and not failed:
            failed.append(shard)
            raise OSError("the step's pod was lost")  # a retryable fault, in one add step only
        return real(layout, work, shard, reader)

    monkeypatch.setattr(backfill.index, "add_part", add_part_failing_once)
    with instance_for_test() as instance:
        embed_all(instance, layout)
        steps_of_one = resources(layout, min_group_vectors=1)
        first = materialize([faiss_index], partition_key="v1", instance=instance, resources=steps_of_one,
                            raise_on_error=False)  # fmt: skip
        assert not first.success and len(add_steps(first)) == 2  # the other two groups committed their parts
        steps = {(e.step_key, e.event_type_value) for e in first.all_events if e.step_key}
        assert ("faiss_index.faiss_index_finish", "STEP_START") not in steps
        assert not layout.store.exists(layout.index_builds(MODEL))  # nothing half-built is visible

        retry = materialize(
            [faiss_index, search_index],
            partition_key="v1",
            instance=instance,
            resources=steps_of_one,
        )
        assert retry.success and len(add_steps(retry)) == 3
        meta = latest_metadata(instance, "faiss_index", "v1")
        assert meta["mode"] == "full" and meta["vectors"] == 60 and meta["recall_at_10"] == 1.0
        assert (meta["parts"]["parts_built"], meta["parts"]["parts_reused"]) == (1, 2)
        checks = {c.check_name: c.passed for c in retry.get_asset_check_evaluations()}
        assert checks == {"recall_at_10": True}
        # the values the steps passed are JSON files under the backfill root, not pickles on one machine's disk
        assert layout.store.ls(layout.store.url(IO_FOLDER, first.run_id))


def test_every_step_of_the_index_build_is_a_step_job_with_backoff_limit_zero():
    ops = {node.name: node.definition for node in faiss_index.node_def.nodes}
    assert set(ops) == set(INDEX_STEP_OPS)
    from dagster_k8s.job import get_user_defined_k8s_config

    for name, definition in ops.items():
        assert get_user_defined_k8s_config(definition.tags).job_spec_config == {"backoff_limit": 0}, name


def test_step_values_are_json_on_the_store_that_another_process_reads(tmp_path):
    # what a step pod writes, a fresh manager on the same root (another pod) reads back; no local pickle
    store = Store.open(str(tmp_path / "root"))
    value = {"folder": "s3://bucket/indexes/m/work/v1-ab", "shards": ["shard-00000", "shard-00001"]}
    out = build_output_context(step_key="faiss_index.faiss_index_plan", name="groups", run_id="run-1", mapping_key="g0")
    StoreIOManager(store).handle_output(out, value)
    path = store.url(IO_FOLDER, "run-1", "faiss_index.faiss_index_plan", "groups", "g0") + ".json"
    assert store.read_json(path) == value
    upstream = build_output_context(
        step_key="faiss_index.faiss_index_plan", name="groups", run_id="run-1", mapping_key="g0"
    )
    assert (
        StoreIOManager(Store.open(str(tmp_path / "root"))).load_input(build_input_context(upstream_output=upstream))
        == value
    )
