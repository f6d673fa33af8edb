"""Reduced precision is opt-in per model version and must match fp32 embeddings before registration."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from backfill.errors import ModelError
from backfill.registry import ModelCard, read_card, register_version
from backfill.runtime import load_model
from tests.conftest import TINY
from backfill.models import torchscript_bytes


class Cancelling(nn.Module):
    """Output = A x - B x with A and B nearly equal: fine in fp32, noise once the matmuls run in bf16."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        base = torch.randn(16, 3 * 32 * 32, generator=g)
        self.a = nn.Linear(3 * 32 * 32, 16, bias=False)
        self.b = nn.Linear(3 * 32 * 32, 16, bias=False)
        self.a.weight.data = base + 1e-3 * torch.randn(base.shape, generator=g)
        self.b.weight.data = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.a(x) - self.b(x)


def _traced(module: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(module.eval(), torch.zeros(2, 3, 32, 32)), buf)
    return buf.getvalue()


def test_bf16_version_registers_and_runs_under_autocast(layout):
    arch = TINY["v1"]
    card = register_version(layout, "refcnn", "v1", torchscript_bytes(arch, calibration=64), dim=arch.dim, input_size=arch.input_size, extra={"precision": "bf16"})
    assert read_card(layout, "refcnn", "v1").precision == "bf16"
    model = load_model(layout, card)
    assert model.autocast is torch.bfloat16
    pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    reduced = model.embed(pixels)
    fp32 = load_model(layout, card)
    fp32.autocast = None
    cosine = (reduced * fp32.embed(pixels)).sum(1)
    assert reduced.dtype == np.float32 and cosine.min() > 0.99


def test_precision_that_drifts_from_fp32_is_refused(layout):
    with pytest.raises(ModelError, match=r"model cancel version v1: bf16 embeddings differ from fp32 .*mean cosine .* < 0.99"):
        register_version(layout, "cancel", "v1", _traced(Cancelling()), dim=16, input_size=32, extra={"precision": "bf16"})
    assert not layout.store.exists(layout.model_dir("cancel", "v1"))  # nothing written
    register_version(layout, "cancel", "v1", _traced(Cancelling()), dim=16, input_size=32)  # fp32 is fine


def test_unknown_precision_in_model_json_is_a_clear_error():
    data = {"name": "m", "version": "v1", "dim": 8, "input_size": 32, "sha256": "0" * 64, "created": "x", "precision": "int4"}
    with pytest.raises(ModelError, match="field 'precision' must be one of fp32, bf16, fp16, got 'int4'"):
        ModelCard.from_json(data, where="m/v1")
    data["precision"] = "fp16"
    card = ModelCard.from_json(data, where="m/v1")
    assert card.precision == "fp16" and card.to_json()["precision"] == "fp16"


def test_cli_registers_a_reference_resnet(tmp_path, capsys):
    from backfill.cli import main
    from backfill.storage import Layout, Store

    root = str(tmp_path / "root")
    # fp32 here (the bf16 check is covered above with a tiny model; a ResNet forward at 224 px is slow on 2 cores)
    assert main(["--root", root, "register", "r18", "--reference", "resnet18"]) == 0
    assert "registered refcnn r18: dim=256 input=224 precision=fp32" in capsys.readouterr().out
    card = read_card(Layout(Store.open(root)), "refcnn", "r18")
    assert (card.dim, card.input_size, card.precision) == (256, 224, "fp32")
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["--root", root, "register", "r18b", "--reference", "resnet18", "--precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
