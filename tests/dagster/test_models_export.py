"""model_version verifies a torch.export (.pt2) version as it does a TorchScript one, and records its contract."""

from dagster import instance_for_test

from backfill.models import export_bytes
from backfill.preprocess import Preprocess
from backfill.registry import register_version
from tests.conftest import MODEL
from tests.dagster.test_assets import add_partitions, embed_one, latest_metadata
from tests.dagster.test_models import WrongDimModel, verify
from tests.engine.test_export import tiny_pt2


def test_a_pt2_version_is_verified_and_its_format_and_contract_recorded(registered):
    layout, _ = registered
    prep = Preprocess(32, resize="resize_crop", resize_size=36, interpolation="bicubic")
    card = register_version(layout, MODEL, "v2", tiny_pt2(), dim=16, preprocess=prep)
    with instance_for_test() as instance:
        result = verify(instance, layout, "v2")
        assert result.success
        [check] = result.get_asset_check_evaluations()
        assert check.passed
        [mat] = result.asset_materializations_for_node("model_version")
        assert mat.metadata["format"].value == "torch.export" and mat.metadata["sha256"].value == card.sha256
        assert mat.metadata["preprocessing"].value == "resize_crop 36->32 bicubic RGB"


def test_a_pt2_with_the_wrong_output_size_fails_its_check(registered):
    layout, _ = registered
    register_version(layout, MODEL, "v2", export_bytes(WrongDimModel(), 32), dim=16, input_size=32)
    with instance_for_test() as instance:
        result = verify(instance, layout, "v2")
        assert not result.success
        [check] = result.get_asset_check_evaluations()
        assert not check.passed and "returned shape (2, 3)" in check.metadata["error"].value


def test_a_pt2_version_is_embedded_by_the_embedding_asset_through_its_contract(registered):
    layout, _ = registered
    prep = Preprocess(32, resize="pad", interpolation="bicubic")
    register_version(layout, MODEL, "v2", tiny_pt2(), dim=16, preprocess=prep)
    with instance_for_test() as instance:
        add_partitions(instance, layout, "v2")
        assert embed_one(instance, layout, "shard-00001", "v2").success
        meta = latest_metadata(instance, "image_embeddings", "v2|shard-00001")
        assert meta["images"] == 20 and meta["rejects"] == 0
