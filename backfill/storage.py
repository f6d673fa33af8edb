"""One fsspec code path for local folders and object stores, with atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from backfill.errors import RetryableError


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@dataclass(frozen=True)
class Store:
    """A root URL (a folder or s3://bucket/prefix) and the filesystem that serves it.

    Writes are atomic: on a local disk through a temporary file and os.replace, on an
    object store through one PUT of the final key (object stores have no rename, and a
    single PUT is all-or-nothing). A reader therefore sees a whole file or none.
    """

    root: str
    fs: fsspec.AbstractFileSystem

    @classmethod
    def open(cls, root: str, **storage_options: Any) -> "Store":
        fs, path = fsspec.core.url_to_fs(root, **storage_options)
        if _is_local(fs):
            path = os.path.abspath(path)
        return cls(root=path.rstrip("/"), fs=fs)

    def url(self, *parts: str) -> str:
        """The full path of a key below the root, as this store's filesystem names it."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def display(self, path: str) -> str:
        """A path as a user would type it (with its protocol)."""
        return path if _is_local(self.fs) else self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def ls(self, path: str) -> list[str]:
        """Names (not paths) directly under a folder; [] when it does not exist."""
        try:
            entries = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        """Commit data at path atomically; a failure leaves no partial file visible."""
        try:
            if _is_local(self.fs):
                _local_atomic_write(path, data)
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            # a full disk or a dropped connection: the same write may succeed on retry
            raise RetryableError(f"could not write {self.display(path)}: {exc}") from exc

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    def rm(self, path: str, recursive: bool = False) -> None:
        self.fs.rm(path, recursive=recursive)


def _local_atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=f".{uuid.uuid4().hex[:8]}.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # includes KeyboardInterrupt/SystemExit from a preemption signal
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass(frozen=True)
class Layout:
    """Where everything lives below one root: the only place that spells out paths."""

    store: Store

    @property
    def manifests(self) -> str:
        return self.store.url("corpus", "manifests")

    @property
    def images(self) -> str:
        return self.store.url("corpus", "images")

    @property
    def registry(self) -> str:
        return self.store.url("registry")

    def manifest(self, shard: str) -> str:
        return self.store.url("corpus", "manifests", f"{shard}.parquet")

    def model_dir(self, model: str, version: str) -> str:
        return self.store.url("registry", model, version)

    def embeddings(self, model: str, version: str, shard: str | None = None) -> str:
        return self.store.url("embeddings", model, version, shard or "")

    def index_builds(self, model: str) -> str:
        return self.store.url("indexes", model, "builds")

    def index_build(self, model: str, build_id: str) -> str:
        return self.store.url("indexes", model, "builds", build_id)

    def pointer(self, model: str) -> str:
        return self.store.url("indexes", model, "CURRENT")

    def retired(self, model: str, version: str | None = None) -> str:
        """Markers of retired versions (backfill/retire.py): the registry sensor never adds them back."""
        return self.store.url("retired", model, f"{version}.json" if version else "")

    def indexed_models(self) -> list[str]:
        return self.store.ls(self.store.url("indexes"))
