"""docs/models.md's bring-your-own-model recipe, run as written, with an encoder written here."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from backfill.cli import main
from backfill.registry import read_card
from backfill.runtime import load_model
from backfill.storage import Layout, Store

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def recipe_blocks() -> tuple[str, str]:
    """The python and bash blocks of the page's "Bring your own model" section."""
    section = DOC.read_text().split("## Bring your own model", 1)[1]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return python, bash


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """model.pt2 as the recipe's python block writes it, for the user's encoder (one export per module)."""
    python, _ = recipe_blocks()
    # the user's encoder: any module from (N, 3, 224, 224) to (N, 512) pooled features
    net = nn.Sequential(nn.Conv2d(3, 512, 7, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    folder = tmp_path_factory.mktemp("byom")
    cwd = os.getcwd()
    os.chdir(folder)  # the recipe writes model.pt2 to the working folder
    try:
        exec(compile(python, str(DOC), "exec"), {"net": net})
    finally:
        os.chdir(cwd)
    return folder / "model.pt2"


def test_the_recipe_exports_registers_and_embeds(exported, tmp_path, monkeypatch, capsys):
    _, bash = recipe_blocks()
    assert exported.is_file()
    monkeypatch.chdir(exported.parent)  # the command names model.pt2 relative to where the recipe wrote it
    args = shlex.split(bash.replace("\\\n", " "))
    assert args[0] == "backfill"
    root = str(tmp_path / "root")
    assert main(["--root", root, *args[1:]]) == 0
    out = capsys.readouterr().out
    assert "registered refcnn v3: dim=512 input=224 precision=fp32 format=torch.export" in out, out
    layout = Layout(Store.open(root))
    card = read_card(layout, "refcnn", "v3")
    assert card.preprocess.describe() == "resize_crop 256->224 bicubic RGB"
    assert card.mean == (0.485, 0.456, 0.406) and card.std == (0.229, 0.224, 0.225)
    model = load_model(layout, card)  # sha256, the .pt2 checks, a probe batch
    vectors = model.embed(np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8))
    assert vectors.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_a_file_that_is_no_model_archive_is_refused_by_name(tmp_path, capsys):
    bogus = tmp_path / "model.pt2"
    bogus.write_bytes(b"not a model")
    assert main(["--root", str(tmp_path / "root"), "register", "v3", "--artifact", str(bogus), "--dim", "8"]) == 2
    err = capsys.readouterr().err
    assert f"--artifact {bogus}: not a torch.export .pt2 (torch.export.save) nor a TorchScript archive" in err


def test_preprocessing_flags_are_checked_and_belong_to_artifacts(exported, tmp_path, capsys):
    root = str(tmp_path / "root")
    assert main(["--root", root, "register", "v1", "--resize", "pad"]) == 2
    assert "--resize go with --artifact; a reference model declares its own" in capsys.readouterr().err
    artifact = ["register", "v3", "--artifact", str(exported), "--dim", "512", "--input-size", "224"]
    assert main(["--root", root, *artifact, "--mean", "0.5,0.5"]) == 2
    err = capsys.readouterr().err
    assert "--mean takes three comma-separated numbers (e.g. 0.485,0.456,0.406), got '0.5,0.5'" in err
    assert main(["--root", root, *artifact, "--resize-size", "300"]) == 2
    assert "preprocessing.resize_size is for resize_crop only (resize is 'squash')" in capsys.readouterr().err
