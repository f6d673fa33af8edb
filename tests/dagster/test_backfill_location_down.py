"""An asset backfill evaluated while its code location fails to load: with the daemon environment this project
ships (harness.local_instance.DAEMON_ENV, the Helm chart's dagsterDaemon.env) it waits for the location; with
Dagster's default it fails for good and its partitions are never requested (found by a chaos round: the code
server SIGKILLed while it was starting up, just as the automation had submitted a version's shard backfill)."""

import logging
import textwrap

import pytest
from dagster import AssetKey, instance_for_test
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.test_utils import create_test_daemon_workspace_context
from dagster._core.workspace.load_target import PythonFileTarget
from dagster._daemon.backfill import execute_backfill_iteration

from harness.local_instance import DAEMON_ENV

GOOD = """
from dagster import Definitions, StaticPartitionsDefinition, asset

@asset(partitions_def=StaticPartitionsDefinition(["a", "b"]))
def shard() -> None:
    return None

defs = Definitions(assets=[shard])
"""


def _workspace(path, instance):
    target = PythonFileTarget(str(path), attribute=None, working_directory=str(path.parent), location_name="loc")
    return create_test_daemon_workspace_context(target, instance)


@pytest.mark.parametrize("shipped", [True, False], ids=["shipped daemon env", "dagster default"])
def test_a_backfill_waits_for_a_code_location_that_fails_to_load(tmp_path, monkeypatch, shipped):
    for name in DAEMON_ENV:
        monkeypatch.delenv(name, raising=False)
    if shipped:
        for name, value in DAEMON_ENV.items():
            monkeypatch.setenv(name, value)
    defs = tmp_path / "defs.py"
    defs.write_text(textwrap.dedent(GOOD))
    with instance_for_test() as instance:
        with _workspace(defs, instance) as context:
            graph = context.create_request_context().asset_graph
            backfill = PartitionBackfill.from_asset_partitions(
                backfill_id="bf1", asset_graph=graph, partition_names=["a", "b"], asset_selection=[AssetKey("shard")],
                backfill_timestamp=0.0, tags={}, dynamic_partitions_store=instance, all_partitions=False,
                title=None, description=None, run_config=None,
            )  # fmt: skip
            instance.add_backfill(backfill)
        defs.write_text("raise RuntimeError('the code server is starting up')\n")  # the location now fails to load
        with _workspace(defs, instance) as context:
            list(execute_backfill_iteration(context, logging.getLogger("test")))
        status = instance.get_backfill("bf1").status
    if shipped:
        assert status == BulkActionStatus.REQUESTED  # skipped this iteration: it resumes once the location loads
    else:
        assert status in (BulkActionStatus.FAILING, BulkActionStatus.FAILED)  # what the chaos round hit


def test_the_cluster_daemon_gets_the_same_environment():
    from pathlib import Path

    import yaml

    values = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "helm" / "values.yaml").read_text())
    assert DAEMON_ENV.items() <= values["dagsterDaemon"]["env"].items()
