"""The accuracy check a reduced precision (bf16, fp16) must pass before a model version may use it."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from backfill.errors import ModelError

MIN_COSINE = 0.99  # mean cosine between reduced-precision and fp32 embeddings of the probe batch
PROBE_IMAGES = 16


def probe_batch(input_size: int, n: int = PROBE_IMAGES, seed: int = 99) -> np.ndarray:
    """uint8 NHWC synthetic scenes (shapes on backgrounds), not noise: closer to what the model will see."""
    from backfill.sample import synthetic_image

    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(synthetic_image(rng).resize((input_size, input_size))) for _ in range(n)])


def precision_cosine(
    module: torch.nn.Module, pixels: np.ndarray, mean, std, dtype: torch.dtype, device: str = "cpu"
) -> float:
    """Mean cosine between the module's fp32 outputs and its outputs under autocast(dtype)."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device).float().div(255.0)
    x = (x - torch.tensor(mean, device=device).view(1, 3, 1, 1)) / torch.tensor(std, device=device).view(1, 3, 1, 1)
    with torch.inference_mode():
        reference = module(x).float()
        with torch.autocast(torch.device(device).type, dtype=dtype):
            reduced = module(x).float()
    if not torch.isfinite(reduced).all():
        return float("nan")
    return float(F.cosine_similarity(reference, reduced, dim=1).mean())


def check_precision(
    artifact: bytes, fmt: str, name: str, version: str, input_size: int, mean, std, precision: str
) -> float:
    """Raise ModelError unless the artifact's embeddings in `precision` match fp32 (mean cosine >= 0.99).

    `fmt` is the artifact's format (torch.export or TorchScript); runtime.load_module loads either, with
    the same safety checks as the embedding steps."""
    from backfill.runtime import load_module

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ModelError(
            f"model {name} version {version}: precision {precision!r} is not one of bf16, fp16 (fp32 needs no check)"
        )
    device = "cuda" if (dtype is torch.float16 and torch.cuda.is_available()) else "cpu"
    module = load_module(artifact, fmt, device, f"model {name} version {version}")
    cosine = precision_cosine(module, probe_batch(input_size), mean, std, dtype, device)
    if not cosine >= MIN_COSINE:  # also catches NaN
        raise ModelError(
            f"model {name} version {version}: {precision} embeddings differ from fp32 on a probe batch of "
            f"{PROBE_IMAGES} images (mean cosine {cosine:.4f} < {MIN_COSINE}); register it with precision fp32"
        )
    return cosine
