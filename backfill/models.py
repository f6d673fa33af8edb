"""Small reference embedding CNNs written here (no downloads): deterministic, fast on a CPU."""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Architecture:
    """A reference model family member: widths per stage, embedding size, input size."""

    widths: tuple[int, ...]
    dim: int
    input_size: int
    seed: int


# Two versions of the same model family, as a registry would see them over time.
REFERENCE = {
    "v1": Architecture(widths=(16, 32, 64, 96), dim=128, input_size=96, seed=1),
    "v2": Architecture(widths=(24, 48, 96, 128), dim=256, input_size=128, seed=2),
}


class RefCNN(nn.Module):
    """Conv stages with multi-scale pooling and a projection, L2-normalised output.

    The weights are a fixed random initialisation (seeded), not trained: random
    convolutional features pooled over space are already a usable near-duplicate
    signature, and per-image normalisation at the input makes them insensitive to
    global colour and brightness shifts.
    """

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(arch.seed)
        self.input_norm = nn.InstanceNorm2d(3, affine=False)
        layers: list[nn.Module] = []
        cin = 3
        for w in arch.widths:
            layers.append(nn.Sequential(nn.Conv2d(cin, w, 3, stride=2, padding=1, bias=False), nn.ReLU()))
            cin = w
        self.stages = nn.ModuleList(layers)
        pooled = 2 * arch.widths[-1] + arch.widths[-2]
        self.project = nn.Linear(pooled, arch.dim, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.orthogonal_(self.project.weight)
        torch.random.set_rng_state(generator_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        prev = x
        for stage in self.stages:
            prev, x = x, stage(x)
        feats = torch.cat(
            [
                F.adaptive_avg_pool2d(x, 1).flatten(1),
                F.adaptive_max_pool2d(x, 1).flatten(1),
                F.adaptive_avg_pool2d(prev, 1).flatten(1),
            ],
            dim=1,
        )
        feats = torch.sqrt(feats.clamp_min(0) + 1e-6)  # power-law normalisation: tames bursty channels
        return F.normalize(self.project(feats), dim=1)


def torchscript_bytes(arch: Architecture) -> bytes:
    """The TorchScript artifact of a reference model (loadable without any Python class)."""
    model = RefCNN(arch).eval()
    example = torch.zeros(2, 3, arch.input_size, arch.input_size)
    with torch.inference_mode():
        scripted = torch.jit.trace(model, example)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    return buf.getvalue()
