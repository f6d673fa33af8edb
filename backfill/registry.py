"""The model registry: versions as folders, model.json written last, artifacts checked before loading."""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from backfill.errors import ConfigError, ModelError
from backfill.storage import Layout

CARD = "model.json"
ARTIFACT = "model.pt"
FORMATS = ("torchscript",)
PRECISIONS = ("fp32", "bf16", "fp16")  # model.json "precision": the autocast dtype this version was checked for


@dataclass(frozen=True)
class ModelCard:
    """What model.json says about a version; the embedding contract of that version."""

    name: str
    version: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sha256: str
    created: str
    artifact: str = ARTIFACT
    format: str = "torchscript"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "ModelCard":
        """Parse and validate a model.json; errors name the version and the field."""

        def bad(problem: str) -> ModelError:
            return ModelError(f"model version at {where}: {CARD} {problem}")

        if not isinstance(data, dict):
            raise bad("must be a JSON object")
        required = {"name": str, "version": str, "dim": int, "input_size": int, "sha256": str, "created": str}
        for key, typ in required.items():
            if key not in data:
                raise bad(f"is missing {key!r}")
            if not isinstance(data[key], typ) or isinstance(data[key], bool):
                raise bad(f"field {key!r} must be {typ.__name__}, got {data[key]!r}")
        if not 1 <= data["dim"] <= 65536:
            raise bad(f"field 'dim' must be in 1..65536, got {data['dim']}")
        if not 8 <= data["input_size"] <= 4096:
            raise bad(f"field 'input_size' must be in 8..4096, got {data['input_size']}")
        norm = data.get("normalization", {})
        mean, std = norm.get("mean", [0.5, 0.5, 0.5]), norm.get("std", [0.5, 0.5, 0.5])
        for key, val in (("mean", mean), ("std", std)):
            if not (isinstance(val, list) and len(val) == 3 and all(isinstance(v, (int, float)) for v in val)):
                raise bad(f"normalization.{key} must be a list of 3 numbers, got {val!r}")
        if any(v <= 0 for v in std):
            raise bad(f"normalization.std must be positive, got {std}")
        if len(data["sha256"]) != 64:
            raise bad("field 'sha256' must be 64 hex digits")
        fmt = data.get("format", "torchscript")
        if fmt not in FORMATS:
            raise bad(f"format {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
        precision = data.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise bad(f"field 'precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        known = set(required) | {"normalization", "format", "artifact"}
        return cls(
            name=data["name"],
            version=data["version"],
            dim=data["dim"],
            input_size=data["input_size"],
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            sha256=data["sha256"].lower(),
            created=data["created"],
            artifact=data.get("artifact", ARTIFACT),
            format=fmt,
            extra={k: v for k, v in data.items() if k not in known},
        )

    @property
    def precision(self) -> str:
        """fp32, or the reduced precision (bf16, fp16) this version passed the accuracy check in."""
        return self.extra.get("precision", "fp32")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data["normalization"] = {"mean": list(data.pop("mean")), "std": list(data.pop("std"))}
        return {**extra, **data}


def register_version(
    layout: Layout,
    name: str,
    version: str,
    artifact: bytes,
    *,
    dim: int,
    input_size: int,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    extra: dict[str, Any] | None = None,
) -> ModelCard:
    """Add a version: the artifact first, model.json last (a version exists once its card does)."""
    _check_name("model name", name)
    _check_name("version", version)
    folder = layout.model_dir(name, version)
    if layout.store.exists(f"{folder}/{CARD}"):
        raise ModelError(f"model {name} version {version} is already registered; versions are immutable")
    if (extra or {}).get("precision", "fp32") != "fp32":
        from backfill.precision import check_precision

        # refuse a reduced precision whose embeddings drift from fp32 before the version exists
        check_precision(artifact, name, version, input_size, mean, std, extra["precision"])
    card = ModelCard(
        name=name,
        version=version,
        dim=dim,
        input_size=input_size,
        mean=mean,
        std=std,
        sha256=hashlib.sha256(artifact).hexdigest(),
        created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        extra=extra or {},
    )
    layout.store.write_bytes(f"{folder}/{ARTIFACT}", artifact)
    layout.store.write_json(f"{folder}/{CARD}", card.to_json())
    return card


def valid_name(value: str) -> bool:
    """Names that become folder names and Dagster partition keys (no '|', ',', '/', spaces)."""
    return bool(value) and value[0] != "." and all(c.isascii() and (c.isalnum() or c in "-_.") for c in value)


def _check_name(what: str, value: str) -> None:
    if not valid_name(value):
        raise ConfigError(f"{what} {value!r} may only use letters, digits, '-', '_' and '.'")


def read_card(layout: Layout, name: str, version: str) -> ModelCard:
    path = f"{layout.model_dir(name, version)}/{CARD}"
    try:
        raw = layout.store.read_bytes(path)
    except FileNotFoundError:
        raise ModelError(f"model {name} version {version}: no {CARD} at {layout.store.display(path)}") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"model {name} version {version}: {CARD} is not valid JSON ({exc})") from None
    card = ModelCard.from_json(data, where=f"{name}/{version}")
    if card.name != name or card.version != version:
        raise ModelError(
            f"model {name} version {version}: {CARD} says name={card.name!r} version={card.version!r}; "
            "the card must match its folder"
        )
    return card


def list_versions(layout: Layout, name: str) -> tuple[list[ModelCard], dict[str, str]]:
    """Registered versions, oldest first, and the versions skipped with the reason."""
    cards, skipped = [], {}
    for version in layout.store.ls(layout.store.url("registry", name)):
        if version.startswith("."):
            continue
        if not layout.store.exists(f"{layout.model_dir(name, version)}/{CARD}"):
            continue  # still being registered: the card is written last
        if not valid_name(version):
            skipped[version] = f"version name {version!r} may only use letters, digits, '-', '_' and '.'"
            continue
        try:
            cards.append(read_card(layout, name, version))
        except ModelError as exc:
            skipped[version] = str(exc)
    cards.sort(key=lambda c: (c.created, c.version))
    return cards, skipped


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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a card's precision on a device, or None for fp32."""
    if precision == "bf16" and (device.type == "cpu" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if precision == "fp16" and device.type == "cuda":
        return torch.float16
    return None  # fp16 on a CPU: no fast kernels, fp32 is the reference anyway


def load_model(layout: Layout, card: ModelCard, device: str = "cpu") -> LoadedModel:
    """Verify the artifact against the card's sha256, load it (TorchScript: no pickle), probe it."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} was asked for model {card.name} version {card.version}, but CUDA is not available "
            "in this process: refusing to run a GPU partition silently on the CPU"
        )
    path = f"{layout.model_dir(card.name, card.version)}/{card.artifact}"
    try:
        blob = layout.store.read_bytes(path)
    except FileNotFoundError:
        raise ModelError(f"model {card.name} version {card.version}: artifact missing at {layout.store.display(path)}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != card.sha256:
        raise ModelError(
            f"model {card.name} version {card.version}: artifact sha256 {digest[:12]}… does not match "
            f"model.json {card.sha256[:12]}…; refusing to load it"
        )
    try:
        module = torch.jit.load(io.BytesIO(blob), map_location=device).eval()
    except Exception as exc:  # a TorchScript archive that does not parse
        raise ModelError(f"model {card.name} version {card.version}: artifact is not loadable TorchScript ({exc})") from None
    model = LoadedModel(card, module, device)
    probe = np.random.default_rng(0).integers(0, 256, (2, card.input_size, card.input_size, 3), dtype=np.uint8)
    vecs = model.embed(probe)
    if not math.isfinite(float(vecs.sum())):
        raise ModelError(f"model {card.name} version {card.version} produced non-finite output on a probe batch")
    return model
