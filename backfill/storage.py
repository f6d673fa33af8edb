"""One fsspec code path for local folders and object stores, with atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from backfill.errors import ConfigError, IncompleteError, RetryableError

# The one setting an S3-compatible store (MinIO, SeaweedFS, Ceph, R2) needs beyond the standard
# AWS credential chain (env, ~/.aws, IRSA web identity), which botocore reads by itself.
S3_ENDPOINT_ENV = "BACKFILL_S3_ENDPOINT_URL"
OBJECT_STORES = ("s3", "s3a")
S3_CONNECTIONS = 512  # per process, opened on demand; EmbedConfig.fetch_workers is capped at it


def filesystem_options(protocol: str) -> dict[str, Any]:
    """How this process opens a filesystem of `protocol`: the same for stores, manifests and images.

    Object stores never use fsspec's listing cache: other processes (pods) write the keys
    this one lists, so a cached listing would hide committed chunks and markers.
    """
    if protocol not in OBJECT_STORES:
        return {}
    # one GET per whole-object read: with max_concurrency > 1, s3fs sends a HEAD first to decide
    # whether to split the read, which doubles the requests for every small image
    # and a connection pool as wide as the requests the fetch stage keeps in flight: botocore's
    # default of 10 connections capped a partition at 10 GETs in flight whatever fetch_workers said
    options: dict[str, Any] = {
        "use_listings_cache": False,
        "max_concurrency": 1,
        "config_kwargs": {"max_pool_connections": S3_CONNECTIONS},
    }
    from backfill.settings import setting  # not at the top: settings imports config, which imports this module

    endpoint = setting(S3_ENDPOINT_ENV)  # validated there: a URL
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the store is unreachable or overloaded right now", not "no such object".

    botocore's connection errors are not OSErrors, so they are named here (when installed).
    """
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError

        kinds.append(BotoCoreError)
    except ImportError:
        pass
    try:
        # not aiohttp.ClientError: it includes ClientResponseError, an HTTP answer such as 403 or
        # 410 for one image URL, which a retry cannot change (images.make_fetcher sorts those)
        from aiohttp import ClientConnectionError, ClientPayloadError

        kinds += [ClientConnectionError, ClientPayloadError]  # ServerTimeoutError is a ClientConnectionError
    except ImportError:
        pass
    return tuple(kinds)


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


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
    def open(cls, root: str, **storage_options: Any) -> Store:
        options = {**filesystem_options(protocol_of(root)), **storage_options}
        try:
            fs, path = fsspec.core.url_to_fs(root, **options)
        except ImportError as exc:
            raise ConfigError(f"root {root!r}: no filesystem for protocol {protocol_of(root)!r} ({exc})") from None
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
        with self._transient("check", path):
            return self.fs.exists(path)

    def ls(self, path: str) -> list[str]:
        """Names (not paths) directly under a folder; [] when it does not exist."""
        with self._transient("list", path):
            try:
                entries = self.fs.ls(path, detail=False, refresh=True)
            except FileNotFoundError:
                return []
        # some S3-compatible stores (SeaweedFS's filer) list an emptied folder as an entry of itself
        here = path.rstrip("/")
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != here)

    def read_bytes(self, path: str) -> bytes:
        with self._transient("read", path):
            return self.fs.cat_file(path)

    def get_file(self, path: str, local_path: str) -> None:
        """Download path to a local file (streamed, not held in memory)."""
        with self._transient("download", path):
            self.fs.get_file(path, local_path)

    @contextlib.contextmanager
    def _transient(self, action: str, path: str):
        # an unreachable store is retryable (the step's retry policy waits for it); FileNotFoundError
        # and PermissionError are answers, not outages, and pass through unchanged
        try:
            yield
        except (FileNotFoundError, PermissionError):
            raise
        except transient_errors() as exc:
            raise RetryableError(
                f"could not {action} {self.display(path)}: store unreachable ({type(exc).__name__}: {exc})"
            ) from exc

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        """Commit data at path atomically; a failure leaves no partial file visible."""
        try:
            if _is_local(self.fs):
                _local_atomic_write(path, data)
            else:
                self.fs.pipe_file(path, data)
        except PermissionError as exc:
            # S3's AccessDenied on a PUT: every retry would be refused the same way
            raise ConfigError(
                f"no permission to write {self.display(path)}: check the credentials/bucket policy for writes ({exc})"
            ) from exc
        except (OSError, *transient_errors()) as exc:
            # a full disk or a dropped connection: the same write may succeed on retry
            raise RetryableError(f"could not write {self.display(path)}: {exc}") from exc

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    def rm(self, path: str, recursive: bool = False) -> None:
        with self._transient("remove", path):
            self.fs.rm(path, recursive=recursive)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_copy(store: Store, path: str, sha256: str, cache_dir: str) -> str:
    """A local file with the verified content of path, for readers that need a file (FAISS).

    On a local store that is the file itself. From an object store the file is downloaded once
    into cache_dir under its checksum (builds are immutable, so the checksum names the content),
    to a temporary name first, and kept only if it matches.
    """
    if not _is_local(store.fs):
        local = os.path.join(cache_dir, sha256[:2], sha256 + "-" + os.path.basename(path))
        if os.path.exists(local) and file_sha256(local) != sha256:
            os.unlink(local)  # a damaged cache entry: fetch it again rather than fail
        if not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            tmp = f"{local}.{uuid.uuid4().hex[:8]}.part"
            try:
                store.get_file(path, tmp)
                if file_sha256(tmp) != sha256:
                    raise IncompleteError(f"{store.display(path)} does not match its recorded sha256 {sha256[:12]}…")
                os.replace(tmp, local)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return local
    if file_sha256(path) != sha256:
        raise IncompleteError(f"{path} does not match its recorded sha256 {sha256[:12]}…")
    return path


def prune_cache(cache_dir: str, keep_shas: set[str]) -> list[str]:
    """Delete the files local_copy cached under cache_dir except those of keep_shas; the paths removed.

    Each near-line update publishes a new build with a new checksum, so without this a long-lived
    reader's cache grows by one index file per update. Partial downloads (*.part) are left alone:
    they belong to a download in progress. One cache_dir must serve one reader process.
    """
    removed: list[str] = []
    if not os.path.isdir(cache_dir):
        return removed
    for prefix in os.listdir(cache_dir):
        folder = os.path.join(cache_dir, prefix)
        if len(prefix) != 2 or not os.path.isdir(folder):
            continue  # not a local_copy folder: not ours to delete
        for name in os.listdir(folder):
            sha = name.split("-", 1)[0]
            if name.endswith(".part") or len(sha) != 64 or not sha.startswith(prefix) or sha in keep_shas:
                continue
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except FileNotFoundError:
                pass
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only succeeds when emptied
    return removed


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _local_atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=f".{uuid.uuid4().hex[:8]}.tmp")
    try:
        # mkstemp creates 0600; a committed file gets the mode open() would give it (0666 less the umask), so a
        # search service or another deployment running as another user on a shared volume can read it
        os.fchmod(fd, 0o666 & ~_umask())
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
