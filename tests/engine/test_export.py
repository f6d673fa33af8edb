"""torch.export artifacts: registered as .pt2 with a dynamic batch, checked before loading; TorchScript still read."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from backfill.config import EmbedConfig
from backfill.embed import embed_shard, load_embeddings
from backfill.errors import ModelError
from backfill.manifest import list_shards
from backfill.models import export_artifact, export_bytes, reference_model
from backfill.registry import CARD, artifact_format, read_card, register_version
from backfill.runtime import check_pt2, load_model
from tests.conftest import MODEL, TINY

_PT2: dict[str, bytes] = {}


def tiny_pt2() -> bytes:
    if "v1" not in _PT2:  # one export per session: tracing costs seconds on a shared CPU
        _PT2["v1"] = export_artifact(TINY["v1"], calibration=64)
    return _PT2["v1"]


def test_a_pt2_version_registers_loads_and_takes_any_batch_size(layout):
    card = register_version(layout, MODEL, "v1", tiny_pt2(), dim=16, input_size=32)
    assert (card.format, card.artifact) == ("torch.export", "model.pt2")
    assert layout.store.exists(f"{layout.model_dir(MODEL, 'v1')}/model.pt2")
    assert read_card(layout, MODEL, "v1").format == "torch.export"
    model = load_model(layout, card)
    eager = reference_model(TINY["v1"], calibration=64)
    for n in (1, 5):  # the batch dimension is dynamic; the probe used 2
        batch = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        vectors = model.embed(batch)
        x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        with torch.no_grad():
            expected = eager(x).numpy()
        assert vectors.shape == (n, 16)
        np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_a_pt2_exported_with_a_static_batch_is_refused_when_loaded(layout):
    # exported without dynamic_shapes on an example batch of 2: it passed a probe of 2 and then failed
    # every partition on its first batch of 64 with a bare guard error
    model = reference_model(TINY["v1"], calibration=64).eval()
    with torch.no_grad():
        program = torch.export.export(model, (torch.zeros(2, 3, 32, 32),))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    card = register_version(layout, MODEL, "v1", buf.getvalue(), dim=16, input_size=32)
    with pytest.raises(ModelError, match=f"model {MODEL} version v1 fails on a probe batch of 3 images.*dynamic batch"):
        load_model(layout, card)


def test_an_existing_torchscript_version_still_loads_and_embeds(layout):
    # a model.json written before torch.export: no "format", no "artifact", no "preprocessing"
    from tests.conftest import register_tiny

    card = register_tiny(layout, "v1")
    folder = layout.model_dir(MODEL, "v1")
    old = {k: v for k, v in layout.store.read_json(f"{folder}/{CARD}").items() if k not in ("format", "artifact")}
    assert "preprocessing" not in old  # registered without a contract, as the demo and harness still do
    layout.store.write_json(f"{folder}/{CARD}", old)
    card = read_card(layout, MODEL, "v1")
    assert (card.format, card.artifact, card.preprocess.resize) == ("torchscript", "model.pt", "squash")
    model = load_model(layout, card)
    shard = list_shards(layout)[0]
    stats = embed_shard(layout, shard, model, EmbedConfig(torch_threads=1, chunk_size=8))
    _, vectors, valid = load_embeddings(layout, MODEL, "v1", shard)
    assert stats.images_embedded_now == len(vectors) == valid.sum() > 0
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)  # stored as float16


def test_the_format_is_read_from_the_artifact_and_a_mismatch_is_refused(layout):
    from tests.conftest import _ARTIFACTS, register_tiny

    register_tiny(layout, "v1")
    script = next(iter(_ARTIFACTS.values()))
    assert artifact_format(script) == "torchscript" and artifact_format(tiny_pt2()) == "torch.export"
    assert artifact_format(b"not an archive") is None
    with pytest.raises(ModelError, match="model refcnn version v2: the artifact is a torchscript archive, not torch"):
        register_version(layout, MODEL, "v2", script, dim=16, input_size=32, format="torch.export")
    assert not layout.store.exists(layout.model_dir(MODEL, "v2"))


def test_a_pt2_in_bf16_is_checked_against_fp32_and_runs_under_autocast(layout):
    from tests.engine.test_precision import Cancelling

    card = register_version(layout, MODEL, "v1", tiny_pt2(), dim=16, input_size=32, extra={"precision": "bf16"})
    model = load_model(layout, card)
    assert card.format == "torch.export" and model.autocast is torch.bfloat16
    pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    fp32 = load_model(layout, card)
    fp32.autocast = None
    assert (model.embed(pixels) * fp32.embed(pixels)).sum(1).min() > 0.99
    with pytest.raises(ModelError, match=r"model cancel version v1: bf16 embeddings differ from fp32 .* < 0.99"):
        register_version(
            layout, "cancel", "v1", export_bytes(Cancelling(), 32), dim=16, input_size=32, extra={"precision": "bf16"}
        )
    assert not layout.store.exists(layout.model_dir("cancel", "v1"))


def _rewritten(blob: bytes, change) -> bytes:
    """The archive with change(name, data) -> data (None drops the file) applied, plus change's extra files."""
    src = zipfile.ZipFile(io.BytesIO(blob))
    root = src.namelist()[0].split("/", 1)[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = change(name[len(root) + 1 :], src.read(name))
            if data is not None:
                dst.writestr(name, data)
        for name, data in getattr(change, "extra", {}).items():
            dst.writestr(f"{root}/{name}", data)
    return out.getvalue()


def _pickled_weight(name: str, data: bytes) -> bytes:
    if name != "data/weights/model_weights_config.json":
        return data
    config = json.loads(data)
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    return json.dumps(config).encode()


def _aoti(name: str, data: bytes) -> bytes:
    return data


_aoti.extra = {"data/aotinductor/model/model.so": b"\x7fELF"}


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def _pickled_sample(name: str, data: bytes) -> bytes:
    if name != "data/sample_inputs/model.pt":
        return data
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "change, reason",
    [
        (_pickled_weight, r"stores \['.*'\] pickled"),
        (_aoti, r"holds \['data/aotinductor/model/model.so'\], which loading would unpickle or execute"),
        (_pickled_sample, "sample inputs are not a weights-only tensor file"),
        (
            lambda name, data: b"[1, 2]" if name == "data/weights/model_weights_config.json" else data,
            "model_weights_config.json is malformed",
        ),
        (lambda name, data: None if name == "archive_format" else data, "no archive_format 'pt2'"),
    ],
)
def test_a_pt2_that_would_unpickle_or_run_native_code_is_refused_before_loading(change, reason, capsys):
    with pytest.raises(ModelError, match=f"model m version v: .*{reason}"):
        check_pt2(_rewritten(tiny_pt2(), change), "model m version v")
    assert "unpickled!" not in capsys.readouterr().out
    with pytest.raises(ModelError, match="not a torch.export .pt2 archive"):
        check_pt2(b"plain bytes", "model m version v")


@torch.library.custom_op("backfill_test::scale", mutates_args=())
def _scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_scale.register_fake
def _(x):
    return torch.empty_like(x)


class _CustomOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scale(x).mean((2, 3))


def test_a_graph_calling_a_non_aten_operator_is_refused(layout):
    card = register_version(layout, MODEL, "v1", export_bytes(_CustomOp(), 32), dim=3, input_size=32)
    with pytest.raises(ModelError, match=r"exported graph calls \['backfill_test.scale.default'\]"):
        load_model(layout, card)


class _PerBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) * 0  # 3 values per image, dim 16 promised


def test_a_pt2_with_the_wrong_output_size_fails_its_probe(layout):
    card = register_version(layout, MODEL, "v1", export_bytes(_PerBatch(), 32), dim=16, input_size=32)
    with pytest.raises(ModelError, match=r"returned shape \(2, 3\) for a batch of 2; model.json promises \(2, 16\)"):
        load_model(layout, card)
