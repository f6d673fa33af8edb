"""ResNet-18 and ResNet-50 written here (no torchvision, no downloads): benchmark-sized reference models."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from backfill.models import export_bytes, trace_bytes

# (block, blocks per stage); widths are the standard 64-128-256-512 (x4 for bottlenecks)
DEPTHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = _shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.down(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.down = _shortcut(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.down(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """A ResNet trunk, global average pool, a linear projection to `dim`, L2-normalised."""

    def __init__(self, kind: str, dim: int = 256, seed: int = 0) -> None:
        super().__init__()
        if kind not in DEPTHS:
            raise ValueError(f"unknown ResNet {kind!r}; known: {', '.join(DEPTHS)}")
        block_name, depths = DEPTHS[kind]
        block = Basic if block_name == "basic" else Bottleneck
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        stages: list[nn.Module] = []
        cin = 64
        for i, n in enumerate(depths):
            width = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                # untrained: keep activations in range through the depth (last BN of a block small)
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        torch.random.set_rng_state(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return F.normalize(self.head(x.mean((2, 3))), dim=1)


def torchscript_bytes(kind: str, dim: int = 256, input_size: int = 224, seed: int = 0) -> bytes:
    """The TorchScript artifact of a (random-weight) ResNet, in eval mode (deprecated format, still read)."""
    return trace_bytes(ResNet(kind, dim, seed).eval(), input_size)


def export_artifact(kind: str, dim: int = 256, input_size: int = 224, seed: int = 0) -> bytes:
    """The torch.export (.pt2) artifact of a (random-weight) ResNet, dynamic batch, for the registry."""
    return export_bytes(ResNet(kind, dim, seed).eval(), input_size)
