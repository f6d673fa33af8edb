"""The model runtime: loaded once, called per batch; a chunk collects its batches' vectors and its rejects."""

import numpy as np
import pytest
import torch

from backfill.errors import ModelError
from backfill.reader import Span
from backfill.registry import read_artifact
from backfill.runtime import Chunk, load_model


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    batch = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


def test_the_model_is_a_callable_per_batch(registered):
    layout, card = registered
    model = load_model(layout, card)
    batch = pixels(3, card.input_size)
    vectors = model(batch).result()
    assert vectors.shape == (3, card.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.array_equal(vectors, model.embed_pixels(batch))


def test_a_chunk_places_vectors_at_their_rows_and_keeps_reasons(registered):
    layout, card = registered
    model = load_model(layout, card)
    chunk = Chunk(model, 6, 12)
    first = Span(6, offsets=[0, 2, 3], rejects=[(1, "missing object: a")], seen=4)
    batch = pixels(2, card.input_size)  # the preparer's tensor holds the images it did not fail on
    assert chunk.launch(first, batch, {1: "truncated or corrupt image: b"}) == 2
    assert chunk.launch(Span(6, rejects=[(4, "bad: c"), (5, "bad: d")], seen=6, last=True), None, {}) == 0
    vectors, valid = chunk.collect()
    assert valid.tolist() == [True, False, False, True, False, False] and chunk.embedded == 2
    assert chunk.errors == [None, "missing object: a", "truncated or corrupt image: b", None, "bad: c", "bad: d"]
    expected = model.embed_pixels(batch)
    np.testing.assert_allclose(vectors[[0, 3]], expected, atol=1e-6)
    assert not vectors[[1, 2, 4, 5]].any()


def test_read_artifact_checks_the_sha256(registered):
    layout, card = registered
    assert len(read_artifact(layout, card)) > 0
    path = f"{layout.model_dir(card.name, card.version)}/{card.artifact}"
    layout.store.write_bytes(path, b"swapped")
    with pytest.raises(ModelError, match="does not match model.json"):
        read_artifact(layout, card)
