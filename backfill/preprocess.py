"""A model version's preprocessing contract: how an image becomes its input (torch-free; batches: preprocess_tensor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from backfill.errors import ConfigError

if TYPE_CHECKING:  # the spec imports no torch: the sensors' code server reads cards without it
    import torch

RESIZES = ("squash", "resize_crop", "pad")
# PIL filter and the torch mode that matches it (antialiased when shrinking, like PIL's resize)
INTERPOLATIONS = {
    "nearest": (Image.NEAREST, "nearest-exact"),
    "bilinear": (Image.BILINEAR, "bilinear"),
    "bicubic": (Image.BICUBIC, "bicubic"),
}
CHANNELS = ("RGB", "BGR")
CROP_FRACTION = 0.875  # resize_crop without resize_size: 224 px crops of the shorter side resized to 256
# JPEGs are decoded at a reduced DCT scale no smaller than this many times the resize target, and PIL
# pre-reduces by whole factors while the rest of the shrink is at least the gap: with a declared contract
# (2x, 3.0) EfficientNet-Lite0's vectors of large JPEGs stay within cosine 0.999 of a full decode; a card
# without one keeps the decoding from before the contract (1x, 2.0): about twice the decode rate, but
# cosine down to 0.989 on large JPEGs
DRAFT = {True: (2, 3.0), False: (1, 2.0)}  # declared -> (draft margin, reducing gap)


@dataclass(frozen=True)
class Geometry:
    """Where a (width, height) image goes: resized to `size`, then cropped at `crop` or pasted at `paste`."""

    size: tuple[int, int]  # (width, height) after the resize
    crop: tuple[int, int] | None = None  # (left, top) of the input_size square cut out of the resized image
    paste: tuple[int, int] | None = None  # (left, top) of the resized image on a black input_size square


@dataclass(frozen=True)
class Preprocess:
    """input_size x input_size pixels from any image, then (x / 255 - mean) / std in `channels` order.

    resize: `squash` (the whole image to the square, aspect ratio lost: the engine's behaviour
    before the contract, and what a model.json without one means), `resize_crop` (the shorter
    side to `resize_size`, then the centre input_size square, as most ImageNet models were
    evaluated), `pad` (the longer side to input_size, centred on black). mean and std are per
    channel in the order the model receives them.
    """

    input_size: int
    resize: str = "squash"
    resize_size: int | None = None  # resize_crop only; default input_size / 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channels: str = "RGB"
    # False for a card written before the contract (no "preprocessing" in model.json): decoded exactly as then
    declared: bool = True

    def __post_init__(self) -> None:
        # each problem names the model.json field it is read from
        size = self.input_size
        if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
            raise ConfigError(f"field 'input_size' must be an integer in 8..4096, got {self.input_size!r}")
        if self.resize not in RESIZES:
            raise ConfigError(f"preprocessing.resize must be one of {', '.join(RESIZES)}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"preprocessing.interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.channels not in CHANNELS:
            raise ConfigError(f"preprocessing.channels must be one of {', '.join(CHANNELS)}, got {self.channels!r}")
        for key in ("mean", "std"):
            val = getattr(self, key)
            if not (isinstance(val, (list, tuple)) and len(val) == 3 and all(_number(v) for v in val)):
                raise ConfigError(f"normalization.{key} must be a list of 3 numbers, got {val!r}")
            object.__setattr__(self, key, tuple(float(v) for v in val))
        if any(v <= 0 for v in self.std):
            raise ConfigError(f"normalization.std must be positive, got {list(self.std)}")
        if self.resize == "resize_crop":
            if self.resize_size is None:
                object.__setattr__(self, "resize_size", round(self.input_size / CROP_FRACTION))
            elif not isinstance(self.resize_size, int) or isinstance(self.resize_size, bool):
                raise ConfigError(f"preprocessing.resize_size must be an integer, got {self.resize_size!r}")
            if not self.input_size <= self.resize_size <= 4 * self.input_size:
                raise ConfigError(
                    f"preprocessing.resize_size must be in {size}..{4 * size} (input_size to 4x), "
                    f"got {self.resize_size}"
                )
        elif self.resize_size is not None:
            raise ConfigError(f"preprocessing.resize_size is for resize_crop only (resize is {self.resize!r})")
        if not self.declared and (self.resize, self.interpolation, self.channels) != ("squash", "bilinear", "RGB"):
            raise ConfigError("a card without a preprocessing contract squashes, bilinear, RGB; declare the contract")

    @classmethod
    def from_card(cls, input_size: int, normalization: Any, preprocessing: Any) -> Preprocess:
        """From model.json's input_size, normalization and optional preprocessing (absent: squash, as before)."""
        norm = {} if normalization is None else normalization
        prep = {} if preprocessing is None else preprocessing
        if not isinstance(norm, dict):
            raise ConfigError(f"normalization must be an object with mean and std, got {norm!r}")
        if not isinstance(prep, dict):
            raise ConfigError(f"preprocessing must be an object, got {prep!r}")
        unknown = set(prep) - {"resize", "resize_size", "interpolation", "channels"}
        if unknown:
            raise ConfigError(f"preprocessing has unknown fields {sorted(unknown)}")
        return cls(
            input_size=input_size,
            resize=prep.get("resize", "squash"),
            resize_size=prep.get("resize_size"),
            interpolation=prep.get("interpolation", "bilinear"),
            mean=norm.get("mean", [0.5, 0.5, 0.5]),
            std=norm.get("std", [0.5, 0.5, 0.5]),
            channels=prep.get("channels", "RGB"),
            declared=preprocessing is not None,
        )

    def card_fields(self) -> dict[str, Any]:
        """The model.json fields of this contract: input_size and normalization (as before) and preprocessing."""
        prep: dict[str, Any] = {"resize": self.resize, "interpolation": self.interpolation, "channels": self.channels}
        if self.resize_size is not None:
            prep["resize_size"] = self.resize_size
        norm = {"mean": list(self.mean), "std": list(self.std)}
        if not self.declared:  # the card stays as it was written before the contract
            return {"input_size": self.input_size, "normalization": norm}
        return {"input_size": self.input_size, "normalization": norm, "preprocessing": prep}

    def describe(self) -> str:
        """One line for the CLI: e.g. 'resize_crop 256->224 bicubic RGB'."""
        size = self.input_size
        geometry = f"{self.resize_size}->{size}" if self.resize == "resize_crop" else f"{size}"
        line = f"{self.resize} {geometry} {self.interpolation} {self.channels}"
        return line if self.declared else f"{line} (no contract in model.json: decoded as before it)"

    @classmethod
    def of(cls, size: int | Preprocess) -> Preprocess:
        """A version's contract, or for a bare input size what a card without one means (squash, as before)."""
        return size if isinstance(size, Preprocess) else cls(size, declared=False)

    def geometry(self, width: int, height: int) -> Geometry:
        """The resize target and crop or paste offset for an image of width x height (both >= 1)."""
        s = self.input_size
        if self.resize == "squash":
            return Geometry((s, s))
        if self.resize == "resize_crop":
            r = self.resize_size
            assert r is not None
            # the shorter side becomes exactly r; the longer one keeps the aspect ratio
            w, h = (r, max(r, int(r * height / width))) if width <= height else (max(r, int(r * width / height)), r)
            return Geometry((w, h), crop=(int(round((w - s) / 2.0)), int(round((h - s) / 2.0))))
        scale = s / max(width, height)
        w, h = max(1, min(s, round(width * scale))), max(1, min(s, round(height * scale)))
        return Geometry((w, h), paste=((s - w) // 2, (s - h) // 2))

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The size a JPEG may be decoded at (PIL's draft picks a DCT scale at least this large)."""
        w, h = self.geometry(width, height).size
        margin = DRAFT[self.declared][0]
        return min(width, margin * w), min(height, margin * h)

    def apply_pil(self, img: Image.Image, geo: Geometry | None = None) -> np.ndarray:
        """An RGB or grayscale ("L") PIL image -> (input_size, input_size, 3) uint8 RGB, by this contract's
        geometry (of the image's own size, or `geo`: that of the original when `img` was decoded at a reduced
        scale). A grayscale image is resized in one channel and made RGB after: the same pixels as converting
        first (the resize treats each channel alike), a third of the resize work."""
        geo = geo or self.geometry(*img.size)
        pil_filter = INTERPOLATIONS[self.interpolation][0]
        # reducing_gap: a large shrink starts with a cheap box reduction (PIL's own speed-up)
        out = img.resize(geo.size, pil_filter, reducing_gap=DRAFT[self.declared][1]) if img.size != geo.size else img
        s = self.input_size
        if geo.crop is not None:
            left, top = geo.crop
            out = out.crop((left, top, left + s, top + s))
        elif geo.paste is not None:
            canvas = Image.new(out.mode, (s, s))
            canvas.paste(out, geo.paste)
            out = canvas
        return np.asarray(out.convert("RGB") if out.mode == "L" else out, dtype=np.uint8)

    def apply_tensor(self, images: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3, H, W) uint8 images of one shape (any device) -> (N, 3, input_size, input_size) uint8, written
        into `into` if given (preprocess_tensor.apply_tensor)."""
        from backfill.preprocess_tensor import apply_tensor  # torch: only where batches are resized on a device

        return apply_tensor(self, images, into)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
