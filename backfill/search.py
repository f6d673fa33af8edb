"""search: embed a query image with the serving model version and return the nearest images."""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow.parquet as pq

from backfill.errors import BackfillError, IncompleteError, RetryableError, UnknownImageError
from backfill.images import decode
from backfill.index import IDS_FILE, INDEX_FILE, read_build
from backfill.publish import read_pointer
from backfill.registry import read_card
from backfill.runtime import LoadedModel, load_model
from backfill.settings import setting
from backfill.storage import Layout, local_copy, prune_cache


@dataclass(frozen=True)
class Hit:
    image_id: int
    uri: str
    score: float


@dataclass(frozen=True)
class SearchResult:
    model: str
    version: str
    build_id: str
    hits: list[Hit]


@dataclass(frozen=True)
class _Served:
    """Everything one answer needs, swapped as one object so a query never mixes two builds."""

    build_id: str
    version: str
    index_sha256: str  # names its file in the download cache
    index: faiss.Index
    ids: np.ndarray
    uris: list[str]
    model: LoadedModel
    by_id: np.ndarray  # positions sorted by image id, to find an image_id's vector


def default_cache_dir() -> str:
    return setting("BACKFILL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "backfill")


class Searcher:
    """Answers queries from whatever CURRENT names, reloading when it moves."""

    def __init__(
        self,
        layout: Layout,
        model: str,
        device: str = "cpu",
        max_image_pixels: int = 64_000_000,
        cache_dir: str | None = None,
    ) -> None:
        self.layout, self.model_name, self.device = layout, model, device
        # index files from an object store are downloaded here (verified) before FAISS reads them
        self.cache_dir = cache_dir or default_cache_dir()
        self.max_image_pixels = max_image_pixels
        self._served: _Served | None = None
        self._lock = threading.Lock()
        self.load_error: str | None = None  # why the build CURRENT names could not be loaded, if it could not
        self._failed: tuple[str, str] | None = None  # (build_id, why) of a build that cannot load, not retried

    def current(self) -> _Served:
        served = self._served
        try:
            pointer = read_pointer(self.layout, self.model_name)
        except RetryableError as exc:
            if served is None:
                raise
            # a storage blip: the loaded build still answers; /healthz says why CURRENT was not read
            self.load_error = f"could not read CURRENT (still serving {served.build_id}): {exc}"
            return served
        if pointer is None:
            raise BackfillError(f"no index is published for model {self.model_name!r} yet")
        build_id = pointer["build_id"]
        if served is not None and served.build_id == build_id:
            self.load_error = None
            return served
        failed = self._failed
        if failed is not None and failed[0] == build_id:
            # this build failed for good: not downloaded again until CURRENT names another one
            if served is None:
                raise IncompleteError(failed[1])
            self.load_error = failed[1]
            return served
        # while one caller loads the new build, the others keep answering from the old one
        if not self._lock.acquire(blocking=served is None):
            return served
        try:
            served = self._served
            if served is not None and served.build_id == build_id:
                return served
            try:
                loaded = self._load_or_explain(build_id, served)
            except BackfillError as exc:
                if not isinstance(exc, RetryableError):
                    self._failed = (build_id, str(exc))
                if served is None:
                    raise
                # keep answering from the build that works; say why the new one does not
                self.load_error = f"{build_id}: {exc}"
                return served
            self._served, self.load_error, self._failed = loaded, None, None
            # the replaced build's index file is no longer read (FAISS holds it in memory)
            prune_cache(self.cache_dir, {loaded.index_sha256})
            return loaded
        finally:
            self._lock.release()

    def _load_or_explain(self, build_id: str, previous: _Served | None) -> _Served:
        """_load, with any failure (a damaged ids.parquet, a FAISS error) as a BackfillError naming the build."""
        try:
            return self._load(build_id, previous)
        except BackfillError:
            raise
        except Exception as exc:
            raise IncompleteError(
                f"index build {self.model_name}/{build_id} could not be loaded: {type(exc).__name__}: {exc}"
            ) from exc

    def _load(self, build_id: str, previous: _Served | None) -> _Served:
        build = read_build(self.layout, self.model_name, build_id)
        folder = self.layout.index_build(self.model_name, build_id)
        try:
            local = local_copy(self.layout.store, f"{folder}/{INDEX_FILE}", build.index_sha256, self.cache_dir)
        except IncompleteError as exc:
            raise IncompleteError(f"index build {self.model_name}/{build_id}: {exc}") from None
        except FileNotFoundError:
            raise IncompleteError(f"index build {self.model_name}/{build_id} has no {INDEX_FILE}") from None
        index = faiss.read_index(local)
        if build.nprobe:
            faiss.extract_index_ivf(index).nprobe = build.nprobe
        if build.nlist:
            faiss.extract_index_ivf(index).make_direct_map()  # reconstruct() by position, for queries by image_id
        table = pq.read_table(io.BytesIO(self.layout.store.read_bytes(f"{folder}/{IDS_FILE}")))
        if table.num_rows != index.ntotal:
            raise IncompleteError(
                f"index build {self.model_name}/{build_id}: "
                f"{IDS_FILE} has {table.num_rows} rows for {index.ntotal} vectors"
            )
        if previous is not None and previous.version == build.version:
            model = previous.model
        else:
            model = load_model(self.layout, read_card(self.layout, self.model_name, build.version), self.device)
        ids = table.column("image_id").to_numpy()
        return _Served(
            build_id,
            build.version,
            build.index_sha256,
            index,
            ids,
            table.column("uri").to_pylist(),
            model,
            np.argsort(ids, kind="stable"),
        )

    def search_image(self, data: bytes, k: int = 10) -> SearchResult:
        served = self.current()
        pixels = decode(data, served.model.card.preprocess, self.max_image_pixels)
        vector = served.model.embed(pixels[None])
        return self._answer(served, vector, k)

    def search_id(self, image_id: int, k: int = 10) -> SearchResult:
        """Neighbours of an indexed image, from its stored vector (the image itself ranks first)."""
        served = self.current()
        at = int(np.searchsorted(served.ids, image_id, sorter=served.by_id))
        if at == len(served.ids) or served.ids[served.by_id[at]] != image_id:
            raise UnknownImageError(
                f"image_id {image_id} is not in index build {served.build_id} of {self.model_name} "
                "(rejected, or not embedded yet)"
            )
        vector = served.index.reconstruct(int(served.by_id[at]))
        return self._answer(served, vector[None], k)

    def _answer(self, served: _Served, vector: np.ndarray, k: int) -> SearchResult:
        scores, positions = served.index.search(np.ascontiguousarray(vector, dtype=np.float32), k)
        hits = [Hit(int(served.ids[p]), served.uris[p], float(s)) for p, s in zip(positions[0], scores[0]) if p >= 0]
        return SearchResult(self.model_name, served.version, served.build_id, hits)
