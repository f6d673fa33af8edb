"""The model runtime: a verified model loaded once per process on its device, called per batch."""

from __future__ import annotations

import io
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from backfill.device import require_device
from backfill.errors import ModelError
from backfill.registry import ModelCard, read_artifact
from backfill.storage import Layout

if TYPE_CHECKING:
    from backfill.reader import Span


class LoadedModel:
    """A verified model on its device; built once per process, called per batch.

    The weights are channels-last, like the batches (NHWC convolutions); a card's
    precision bf16/fp16 runs the forward under autocast where the device supports it,
    else in fp32 (the reference the precision was checked against).
    """

    def __init__(self, card: ModelCard, module: torch.jit.ScriptModule, device: str) -> None:
        self.card = card
        self.module = module
        self.device = torch.device(device)
        self.autocast = autocast_dtype(card.precision, self.device)
        # NHWC weights to match the NHWC batches: oneDNN (CPU) and cuDNN (tensor cores) run them
        # without layout conversions around every convolution
        self.module = module.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels once
        # (x / 255 - mean) / std as one multiply-add per element
        mean = torch.tensor(card.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(card.std, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    def __call__(self, pixels: torch.Tensor) -> "PendingEmbedding":
        """The model stage per batch (the model was loaded once, by load_model): embed_pixels_async."""
        return self.embed_pixels_async(pixels)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NHWC images of the card's input size -> float32 unit vectors (N, dim)."""
        if not batch.flags.writeable:  # decoded PIL buffers are read-only views
            batch = batch.copy()
        return self.embed_pixels(torch.from_numpy(batch).permute(0, 3, 1, 2))

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, H, W) pixels (any device, any memory layout) -> float32 unit vectors (N, dim)."""
        return self.embed_pixels_async(pixels).result()

    def embed_pixels_async(self, pixels: torch.Tensor) -> "PendingEmbedding":
        """embed_pixels without waiting for the device: on CUDA the kernels and the copy of the
        vectors into pinned host memory are queued and a CUDA event marks their end, so the
        caller can queue the next batch while this one runs; `.result()` waits for that event
        (not the whole device) and checks the vectors. On a CPU the work is done here."""
        n = len(pixels)
        with torch.inference_mode():
            x = pixels.to(self.device, non_blocking=True)
            if x.device.type == "cuda" and pixels.device == x.device:
                # made on another stream (the batch preparer's): keep its memory from being reused
                # before this stream's kernels have read it
                x.record_stream(torch.cuda.current_stream(x.device))
            x = x.contiguous(memory_format=torch.channels_last)
            x = torch.addcmul(self._shift, x.float(), self._scale)
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    y = self.module(x)
            else:
                y = self.module(x)
            if y.ndim != 2 or y.shape != (n, self.card.dim):
                raise ModelError(
                    f"model {self.card.name} version {self.card.version} returned shape {tuple(y.shape)} "
                    f"for a batch of {n}; model.json promises ({n}, {self.card.dim})"
                )
            finite = torch.isfinite(y).all()
            vectors = F.normalize(y.float(), dim=1)
            if self.device.type != "cuda":
                return PendingEmbedding(self.card, vectors.numpy(), bool(finite), None)
            host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
            host.copy_(vectors, non_blocking=True)
            finite_host = torch.empty((), dtype=torch.bool, pin_memory=True)
            finite_host.copy_(finite, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return PendingEmbedding(self.card, host, finite_host, done)


class PendingEmbedding:
    """The vectors of one batch, possibly still being computed on a CUDA stream."""

    def __init__(self, card: ModelCard, vectors, finite, done) -> None:
        self._card, self._vectors, self._finite, self._done = card, vectors, finite, done

    def result(self) -> np.ndarray:
        """float32 unit vectors (N, dim); ModelError if the model returned NaN or inf."""
        if self._done is not None:
            self._done.synchronize()  # this batch's work only, not the device
            self._done = None
            self._vectors, self._finite = self._vectors.numpy(), bool(self._finite)
        if not self._finite:
            raise ModelError(f"model {self._card.name} version {self._card.version} returned NaN or inf embeddings")
        return self._vectors


class Chunk:
    """The rows start..end of one chunk as the model stage sees them: its batches' pending vectors, its rejects."""

    def __init__(self, model: LoadedModel, start: int, end: int) -> None:
        self.model, self.start, self.end = model, start, end
        self.errors: list[str | None] = [None] * (end - start)
        self.parts: list[tuple[list[int], PendingEmbedding]] = []  # (chunk offsets, their vectors)
        self.embedded = 0
        self.began = time.monotonic()

    def launch(self, span: "Span", pixels: torch.Tensor | None, failed: dict[int, str]) -> int:
        """Queue the model on a prepared batch; its rejects keep their reason. Returns the rows embedded."""
        for i, reason in span.rejects:
            self.errors[i] = reason
        for j, reason in failed.items():
            self.errors[span.offsets[j]] = reason
        rows = [i for j, i in enumerate(span.offsets) if j not in failed]
        if rows:
            self.parts.append((rows, self.model(pixels)))
            self.embedded += len(rows)
        return len(rows)

    def collect(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (n, dim) float32, valid mask): waits for the device."""
        vectors = np.zeros((self.end - self.start, self.model.card.dim), dtype=np.float32)
        valid = np.zeros(self.end - self.start, dtype=bool)
        for rows, pending in self.parts:
            vectors[rows] = pending.result()
            valid[rows] = True
        return vectors, valid


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a card's precision on a device, or None for fp32."""
    if precision == "bf16" and (device.type == "cpu" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if precision == "fp16" and device.type == "cuda":
        return torch.float16
    return None  # fp16 on a CPU: no fast kernels, fp32 is the reference anyway


def load_model(layout: Layout, card: ModelCard, device: str = "cpu") -> LoadedModel:
    """Verify the artifact against the card's sha256, load it (TorchScript: no pickle), probe it."""
    require_device(device, f"model {card.name} version {card.version} was asked to run",
                   "refusing to run a GPU partition silently on the CPU")
    blob = read_artifact(layout, card)
    try:
        module = torch.jit.load(io.BytesIO(blob), map_location=device).eval()
    except Exception as exc:  # a TorchScript archive that does not parse
        what = f"model {card.name} version {card.version}"
        raise ModelError(f"{what}: artifact is not loadable TorchScript ({exc})") from None
    model = LoadedModel(card, module, device)
    probe = np.random.default_rng(0).integers(0, 256, (2, card.input_size, card.input_size, 3), dtype=np.uint8)
    vecs = model.embed(probe)
    if not math.isfinite(float(vecs.sum())):
        raise ModelError(f"model {card.name} version {card.version} produced non-finite output on a probe batch")
    return model
