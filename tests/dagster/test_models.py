"""model_version: verification runs as a step; a broken version is a red check and stays missing."""

import io
import re

import pytest
import torch
from dagster import AssetKey, instance_for_test, materialize

from assets.models import model_version
from backfill.registry import register_version
from tests.conftest import MODEL
from tests.dagster.test_assets import resources


def scripted(module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


class NaNModel(torch.nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 16), float("nan"))


class WrongDimModel(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))  # 3 values per image, not the 16 the card promises


def verify(instance, layout, version: str):
    instance.add_dynamic_partitions("model_version", [version])
    return materialize(
        [model_version], partition_key=version, instance=instance, resources=resources(layout), raise_on_error=False
    )


def test_a_good_version_is_materialized_with_a_passing_check(registered):
    layout, card = registered
    with instance_for_test() as instance:
        result = verify(instance, layout, "v1")
        assert result.success
        [check] = result.get_asset_check_evaluations()
        assert check.passed and check.check_name == "verified"
        [mat] = result.asset_materializations_for_node("model_version")
        assert mat.metadata["sha256"].value == card.sha256 and mat.metadata["dim"].value == 16


@pytest.mark.parametrize(
    "artifact, reason",
    [
        (lambda: scripted(NaNModel()), "returned NaN or inf embeddings"),
        (lambda: scripted(WrongDimModel()), r"returned shape \(2, 3\) .* promises \(2, 16\)"),
        (lambda: b"not a torchscript archive", "not loadable TorchScript"),
    ],
)
def test_a_broken_version_fails_its_check_with_the_reason_and_stays_missing(registered, artifact, reason):
    layout, _ = registered
    register_version(layout, MODEL, "v2", artifact(), dim=16, input_size=32)
    with instance_for_test() as instance:
        result = verify(instance, layout, "v2")
        assert not result.success
        [check] = result.get_asset_check_evaluations()
        assert not check.passed
        assert re.search(f"model refcnn version v2.*{reason}", check.metadata["error"].value), check.metadata
        assert instance.get_latest_materialization_event(AssetKey("model_version")) is None
        # permanent: no run retry either (the run worker's death is what run retries are for)
        assert instance.get_run_by_id(result.run_id).tags["dagster/retry_on_asset_or_op_failure"] == "false"


def test_a_tampered_artifact_fails_its_checksum(registered):
    layout, _ = registered
    layout.store.write_bytes(f"{layout.model_dir(MODEL, 'v1')}/model.pt", b"tampered")
    with instance_for_test() as instance:
        [check] = verify(instance, layout, "v1").get_asset_check_evaluations()
        assert not check.passed and "does not match model.json" in check.metadata["error"].value
