"""Small reference embedding CNNs written here (no downloads): deterministic, fast on a CPU."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
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

    The convolutions are a fixed random initialisation (seeded), not trained: random
    convolutional features pooled over space are a usable near-duplicate signature
    once centred and PCA-whitened on unlabelled images (calibrate), and per-image
    normalisation at the input makes them insensitive to global colour shifts.
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
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        # set by calibrate(): centre and PCA-whiten the pooled features (random features
        # share a large common component that would make every pair look alike)
        self.register_buffer("feature_mean", torch.zeros(pooled))
        self.register_buffer("projection", torch.linalg.qr(torch.randn(pooled, arch.dim))[0])
        torch.random.set_rng_state(generator_state)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before centring and projection."""
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
        return torch.sqrt(feats.clamp_min(0) + 1e-6)  # power-law normalisation: tames bursty channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize((self.features(x) - self.feature_mean) @ self.projection, dim=1)

    @torch.inference_mode()
    def calibrate(self, images: torch.Tensor, whitening_power: float = 0.5) -> None:
        """Learn the centring and a PCA projection from unlabelled images (N >= pooled dims)."""
        feats = self.features(images).double()
        mean = feats.mean(0)
        eigval, eigvec = torch.linalg.eigh(torch.cov((feats - mean).T))
        top = torch.argsort(eigval, descending=True)[: self.projection.shape[1]]
        scale = eigval[top].clamp_min(1e-12) ** (-whitening_power / 2)
        self.feature_mean.copy_(mean.float())
        self.projection.copy_((eigvec[:, top] * scale).float())


def calibration_images(arch: Architecture, n: int = 768) -> torch.Tensor:
    """Normalised synthetic images for calibrate(), drawn apart from any corpus (own seed)."""
    from backfill.sample import synthetic_image

    rng = np.random.default_rng(10_000 + arch.seed)
    size = arch.input_size
    batch = np.stack([np.asarray(synthetic_image(rng).resize((size, size)), dtype=np.float32) for _ in range(n)])
    return (torch.from_numpy(batch).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5


def reference_model(arch: Architecture, calibration: int = 768) -> RefCNN:
    """A reference model in eval mode, calibrated on synthetic images."""
    model = RefCNN(arch).eval()
    model.calibrate(calibration_images(arch, n=calibration))
    return model


def export_artifact(arch: Architecture, calibration: int = 768) -> bytes:
    """The torch.export (.pt2) artifact of a reference model: the registry's primary format."""
    return export_bytes(reference_model(arch, calibration), arch.input_size)


def torchscript_bytes(arch: Architecture, calibration: int = 768) -> bytes:
    """The TorchScript artifact of a reference model (deprecated format, still read for existing versions)."""
    return trace_bytes(reference_model(arch, calibration), arch.input_size)


def export_bytes(model: nn.Module, input_size: int, max_batch: int = 8192) -> bytes:
    """A model in eval mode exported on (N, 3, input_size, input_size), N dynamic, as torch.export.save bytes.

    The batch dimension is dynamic (1..max_batch, the largest batch_size EmbedConfig allows) so one artifact
    serves any batch size; the image
    size is fixed, as the preprocessing contract fixes it. Export fails (torch's error) for a model
    whose code specialises on the batch size.
    """
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example = torch.zeros(2, 3, input_size, input_size)
    with torch.no_grad():
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # torch's note when a buffer is a view of a larger storage (the QR projection): saved whole anyway
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, buf)
    return buf.getvalue()


def trace_bytes(model: nn.Module, input_size: int) -> bytes:
    """A model in eval mode traced on (2, 3, input_size, input_size) and saved as TorchScript bytes."""
    example = torch.zeros(2, 3, input_size, input_size)
    buf = io.BytesIO()
    with torch.inference_mode(), warnings.catch_warnings():
        # TorchScript is deprecated in torch 2.13; the registry still reads it for existing versions
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(model, example), buf)
    return buf.getvalue()
