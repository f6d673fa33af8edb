import json

import numpy as np
import pytest
import torch

from backfill.errors import ConfigError, ModelError
from backfill.registry import CARD, list_versions, read_card
from backfill.runtime import load_model
from tests.conftest import MODEL, TINY, register_tiny


def test_register_then_load_and_embed(registered):
    layout, card = registered
    assert card.dim == 16 and card.input_size == 32
    cards, skipped = list_versions(layout, MODEL)
    assert [c.version for c in cards] == ["v1"] and skipped == {}
    model = load_model(layout, read_card(layout, MODEL, "v1"))
    vecs = model.embed(np.zeros((3, 32, 32, 3), np.uint8))
    assert vecs.shape == (3, 16)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_versions_are_immutable(registered):
    layout, _ = registered
    with pytest.raises(ModelError, match="already registered"):
        register_tiny(layout, "v1")


def test_version_without_card_is_not_listed(layout):
    # the card is written last: an artifact alone is a registration in progress
    layout.store.write_bytes(f"{layout.model_dir(MODEL, 'v9')}/model.pt", b"partial")
    assert list_versions(layout, MODEL) == ([], {})


def test_malformed_card_is_skipped_with_reason(registered):
    layout, _ = registered
    layout.store.write_bytes(f"{layout.model_dir(MODEL, 'v2')}/{CARD}", b"{not json")
    cards, skipped = list_versions(layout, MODEL)
    assert [c.version for c in cards] == ["v1"]
    assert "v2" in skipped and "not valid JSON" in skipped["v2"]


def test_card_with_wrong_field_type_names_the_field(registered):
    layout, card = registered
    data = card.to_json() | {"version": "v3", "dim": "sixteen"}
    layout.store.write_json(f"{layout.model_dir(MODEL, 'v3')}/{CARD}", data)
    with pytest.raises(ModelError, match=r"refcnn/v3: model.json field 'dim' must be int"):
        read_card(layout, MODEL, "v3")


def test_sha256_mismatch_refuses_to_load(registered):
    layout, card = registered
    layout.store.write_bytes(f"{layout.model_dir(MODEL, 'v1')}/model.pt", b"tampered")
    with pytest.raises(ModelError, match="sha256 .* does not match"):
        load_model(layout, card)


def test_missing_artifact(registered):
    layout, card = registered
    layout.store.rm(f"{layout.model_dir(MODEL, 'v1')}/model.pt")
    with pytest.raises(ModelError, match="artifact missing"):
        load_model(layout, card)


def test_wrong_output_dimension_is_caught_at_load(layout):
    arch = TINY["v1"]
    card = register_tiny(layout, "v1")
    # a card that promises a dimension the artifact does not produce
    lying = card.to_json() | {"version": "v5", "dim": arch.dim + 1}
    layout.store.write_bytes(f"{layout.model_dir(MODEL, 'v5')}/model.pt", layout.store.read_bytes(f"{layout.model_dir(MODEL, 'v1')}/model.pt"))
    layout.store.write_bytes(f"{layout.model_dir(MODEL, 'v5')}/{CARD}", json.dumps(lying).encode())
    with pytest.raises(ModelError, match=r"version v5 returned shape \(2, 16\)"):
        load_model(layout, read_card(layout, MODEL, "v5"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_gpu_device_without_cuda_fails_clearly(registered):
    layout, card = registered
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_model(layout, card, device="cuda")
