"""The model runtime: a verified model loaded once per process on its device, called per batch."""

from __future__ import annotations

import io
import json
import math
import re
import time
import warnings
import zipfile
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

    def __init__(self, card: ModelCard, module: torch.nn.Module, device: str) -> None:
        self.card = card
        self.module = module
        self.device = torch.device(device)
        self.autocast = autocast_dtype(card.precision, self.device)
        # NHWC weights to match the NHWC batches: oneDNN (CPU) and cuDNN (tensor cores) run them
        # without layout conversions around every convolution
        self.module = module.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels once
        # a BGR model gets its channels swapped before the normalisation (mean/std are in its order)
        self._bgr = card.preprocess.channels == "BGR"
        # (x / 255 - mean) / std as one multiply-add per element
        mean = torch.tensor(card.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(card.std, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    def __call__(self, pixels: torch.Tensor) -> PendingEmbedding:
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

    def embed_pixels_async(self, pixels: torch.Tensor) -> PendingEmbedding:
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
            if self._bgr:
                x = x.flip(1)
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

    def launch(self, span: Span, pixels: torch.Tensor | None, failed: dict[int, str]) -> int:
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
    """Verify the artifact against the card's sha256, load it without unpickling anything, probe it."""
    require_device(
        device,
        f"model {card.name} version {card.version} was asked to run",
        "refusing to run a GPU partition silently on the CPU",
    )
    blob = read_artifact(layout, card)
    module = load_module(blob, card.format, device, f"model {card.name} version {card.version}")
    model = LoadedModel(card, module, device)
    rng = np.random.default_rng(0)
    # two batch sizes (2 and 3): an export whose batch dimension is not dynamic (specialised on its example
    # batch, often 2) passes one size and would fail every partition on its first full or short last batch
    for n in PROBE_BATCHES:
        probe = rng.integers(0, 256, (n, card.input_size, card.input_size, 3), dtype=np.uint8)
        try:
            vecs = model.embed(probe)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                f"model {card.name} version {card.version} fails on a probe batch of {n} images "
                f"({type(exc).__name__}: {str(exc)[:300]}); export it with a dynamic batch dimension "
                "(docs/models.md)"
            ) from None
        if not math.isfinite(float(vecs.sum())):
            raise ModelError(f"model {card.name} version {card.version} produced non-finite output on a probe batch")
    return model


PROBE_BATCHES = (2, 3)


def load_module(blob: bytes, fmt: str, device: str, what: str) -> torch.nn.Module:
    """An artifact's module on `device`, in eval mode: torch.export (.pt2) or TorchScript (deprecated).

    Neither path runs Python's unpickler: the TorchScript loader reads its archive with its own C++
    reader (tensors and TorchScript types, no Python globals), and a .pt2 is checked (check_pt2) to hold
    only an exported graph and raw tensors before torch.export.load, which would unpickle otherwise.
    """
    if fmt == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # still read for existing versions
                return torch.jit.load(io.BytesIO(blob), map_location=device).eval()
        except Exception as exc:  # a TorchScript archive that does not parse
            raise ModelError(f"{what}: artifact is not loadable TorchScript ({exc})") from None
    check_pt2(blob, what)
    try:
        program = torch.export.load(io.BytesIO(blob))
    except Exception as exc:
        raise ModelError(f"{what}: artifact is not a loadable torch.export program ({exc})") from None
    check_ops(program, what)
    # an exported module keeps the mode it was exported in (eval for a registry artifact); .eval()
    # on it is refused by torch, so it is only moved
    return program.module().to(device)


# what torch.export.save writes for a program with plain tensors; anything else (pickled tensor
# subclasses, custom or opaque objects, AOTInductor shared libraries, legacy pickled weights) is refused
_PT2_FILES = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/(weight_\d+|model_weights_config\.json)|data/constants/(tensor_\d+|model_constants_config\.json)"
    r"|data/sample_inputs/model\.pt|extra/[\w.-]+)"
)


def check_pt2(blob: bytes, what: str) -> None:
    """Refuse a .pt2 whose loading would unpickle or run anything but an exported graph of tensors.

    torch.export.load unpickles (weights_only=False) tensor subclasses and custom objects, falls back
    to full unpickling when the sample inputs fail a weights_only load, and loads AOTInductor shared
    libraries; an archive with none of those holds JSON (the graph, the tensor metadata) and raw bytes.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(blob))
    except zipfile.BadZipFile:
        raise ModelError(f"{what}: artifact is not a torch.export .pt2 archive (not a zip file)") from None
    with archive:
        names = archive.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1:
            raise ModelError(f"{what}: .pt2 archive has {len(roots)} top-level folders; torch.export.save writes one")
        root = roots.pop()
        files = {n[len(root) + 1 :]: n for n in names if not n.endswith("/")}
        odd = sorted(f for f in files if not _PT2_FILES.fullmatch(f))
        if odd:
            raise ModelError(
                f"{what}: .pt2 archive holds {odd[:3]}, which loading would unpickle or execute; only an exported "
                "program with plain tensor weights is accepted (re-export it without custom objects or AOTInductor)"
            )
        if files.get("archive_format") is None or archive.read(files["archive_format"]).strip() != b"pt2":
            raise ModelError(f"{what}: artifact is not a torch.export .pt2 archive (no archive_format 'pt2')")
        for config in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
            if config not in files:
                continue
            try:
                entries = json.loads(archive.read(files[config])).get("config", {})
                pickled = sorted(k for k, meta in entries.items() if meta.get("use_pickle"))
            except (ValueError, AttributeError, TypeError):  # not JSON, or not the shape torch writes
                raise ModelError(f"{what}: .pt2 {config} is malformed; re-export it with torch.export.save") from None
            if pickled:
                raise ModelError(f"{what}: .pt2 stores {pickled[:3]} pickled (tensor subclasses); refusing to load it")
        if "data/sample_inputs/model.pt" in files:
            sample = io.BytesIO(archive.read(files["data/sample_inputs/model.pt"]))
            try:  # torch tries weights_only first and unpickles fully only if that fails: never let it fail
                torch.load(sample, weights_only=True)
            except Exception as exc:
                raise ModelError(f"{what}: .pt2 sample inputs are not a weights-only tensor file ({exc})") from None


# aten operators that reach outside the tensors they are given (aten.from_file reads a host file)
_HOST_OPS = {torch.ops.aten.from_file.default}


def check_ops(program: torch.export.ExportedProgram, what: str) -> None:
    """Every call in the exported graph is an ATen operator on tensors (or a builtin getitem / symbolic size op)."""
    odd = set()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten" and target not in _HOST_OPS:
            continue
        if getattr(target, "__module__", None) in ("_operator", "operator"):
            continue
        odd.add(str(target))
    if odd:
        raise ModelError(f"{what}: exported graph calls {sorted(odd)[:3]}; only aten operators are accepted")
