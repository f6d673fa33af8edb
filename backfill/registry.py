"""The model registry: versions as folders, model.json written last, artifacts checked before loading."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from backfill.errors import ConfigError, ModelError
from backfill.preprocess import Preprocess
from backfill.storage import Layout

CARD = "model.json"
ARTIFACT = "model.pt"  # a TorchScript version's artifact (deprecated format; still read)
# format -> artifact file name; torch.export is the primary format, TorchScript is deprecated in torch 2.13
ARTIFACTS = {"torch.export": "model.pt2", "torchscript": ARTIFACT}
FORMATS = tuple(ARTIFACTS)
PRECISIONS = ("fp32", "bf16", "fp16")  # model.json "precision": the autocast dtype this version was checked for


@dataclass(frozen=True)
class ModelCard:
    """What model.json says about a version; the embedding contract of that version."""

    name: str
    version: str
    dim: int
    preprocess: Preprocess
    sha256: str
    created: str
    artifact: str = ARTIFACT
    format: str = "torchscript"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        return self.preprocess.input_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocess.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocess.std

    @classmethod
    def from_json(cls, data: Any, where: str) -> ModelCard:
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
        try:
            # no "preprocessing" (cards written before the contract): squash, bilinear, RGB
            preprocess = Preprocess.from_card(data["input_size"], data.get("normalization"), data.get("preprocessing"))
        except ConfigError as exc:
            raise bad(str(exc)) from None
        if len(data["sha256"]) != 64:
            raise bad("field 'sha256' must be 64 hex digits")
        fmt = data.get("format", "torchscript")
        if fmt not in FORMATS:
            raise bad(f"format {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
        precision = data.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise bad(f"field 'precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        known = set(required) | {"normalization", "preprocessing", "format", "artifact"}
        return cls(
            name=data["name"],
            version=data["version"],
            dim=data["dim"],
            preprocess=preprocess,
            sha256=data["sha256"].lower(),
            created=data["created"],
            artifact=data.get("artifact", ARTIFACTS[fmt]),
            format=fmt,
            extra={k: v for k, v in data.items() if k not in known},
        )

    @property
    def precision(self) -> str:
        """fp32, or the reduced precision (bf16, fp16) this version passed the accuracy check in."""
        return self.extra.get("precision", "fp32")

    def to_json(self) -> dict[str, Any]:
        fields = {
            "name": self.name,
            "version": self.version,
            "dim": self.dim,
            **self.preprocess.card_fields(),
            "sha256": self.sha256,
            "created": self.created,
            "artifact": self.artifact,
            "format": self.format,
        }
        return {**self.extra, **fields}


def artifact_format(blob: bytes) -> str | None:
    """An artifact's format from its bytes: torch.export (torch.export.save), torchscript (torch.jit.save), or None."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            names = archive.namelist()
            for name in names:
                if name.endswith("/archive_format") and archive.read(name).strip() == b"pt2":
                    return "torch.export"
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    # torch.jit.save: <name>/data.pkl and <name>/code/...
    if any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    return None


def register_version(
    layout: Layout,
    name: str,
    version: str,
    artifact: bytes,
    *,
    dim: int,
    input_size: int | None = None,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    preprocess: Preprocess | None = None,
    format: str | None = None,
    extra: dict[str, Any] | None = None,
) -> ModelCard:
    """Add a version: the artifact first, model.json last (a version exists once its card does).

    The contract is `preprocess`, or (as before it existed) input_size with mean and std: then the card is
    written as before (squash, no "preprocessing"), and decoded exactly as before.
    The format is read from the artifact when not given; bytes that are neither archive are recorded
    as TorchScript, as before, and the model_version check refuses them with the loader's reason.
    """
    _check_name("model name", name)
    _check_name("version", version)
    if preprocess is None:
        if input_size is None:
            raise ConfigError(f"model {name} version {version}: give input_size (or a preprocessing contract)")
        # as before the contract: model.json gets no "preprocessing", and images are decoded as they were
        preprocess = Preprocess(input_size, mean=mean, std=std, declared=False)
    elif input_size is not None and input_size != preprocess.input_size:
        raise ConfigError(f"input_size {input_size} disagrees with the preprocessing's {preprocess.input_size}")
    found = artifact_format(artifact)
    if format is None:
        format = found or "torchscript"
    elif format not in FORMATS:
        raise ConfigError(f"artifact format {format!r} is not supported (supported: {', '.join(FORMATS)})")
    elif found is not None and found != format:
        raise ModelError(f"model {name} version {version}: the artifact is a {found} archive, not {format}")
    folder = layout.model_dir(name, version)
    if layout.store.exists(f"{folder}/{CARD}"):
        raise ModelError(f"model {name} version {version} is already registered; versions are immutable")
    if (extra or {}).get("precision", "fp32") != "fp32":
        # refuse a reduced precision whose embeddings drift from fp32 before the version exists
        from backfill.precision import check_precision  # torch: only when a reduced precision is declared

        p = preprocess
        check_precision(artifact, format, name, version, p.input_size, p.mean, p.std, extra["precision"])
    card = ModelCard(
        name=name,
        version=version,
        dim=dim,
        preprocess=preprocess,
        sha256=hashlib.sha256(artifact).hexdigest(),
        created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        artifact=ARTIFACTS[format],
        format=format,
        extra=extra or {},
    )
    layout.store.write_bytes(f"{folder}/{card.artifact}", artifact)
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
