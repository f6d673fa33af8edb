"""The model registry: versions as folders, model.json written last, artifacts checked before loading."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

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


def read_artifact(layout: Layout, card: ModelCard) -> bytes:
    """The artifact of a version, checked against its card's sha256 (a corrupt or swapped file is refused)."""
    path = f"{layout.model_dir(card.name, card.version)}/{card.artifact}"
    try:
        blob = layout.store.read_bytes(path)
    except FileNotFoundError:
        where = layout.store.display(path)
        raise ModelError(f"model {card.name} version {card.version}: artifact missing at {where}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != card.sha256:
        raise ModelError(
            f"model {card.name} version {card.version}: artifact sha256 {digest[:12]}… does not match "
            f"model.json {card.sha256[:12]}…; refusing to load it"
        )
    return blob
