"""build_index: check completeness, choose and train a FAISS index, measure recall, tune nprobe."""

from __future__ import annotations

import hashlib
import io
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backfill.config import IndexConfig
from backfill.embed import MARKER, load_embeddings
from backfill.errors import IncompleteError
from backfill.manifest import find_cross_shard_duplicates, read_shard
from backfill.storage import Layout

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
BUILD_FILE = "build.json"


@dataclass(frozen=True)
class IndexSpec:
    factory: str  # a faiss.index_factory string
    nlist: int  # 0 for exact indexes

    @property
    def is_ivf(self) -> bool:
        return self.nlist > 0


def choose_index(n: int, dim: int, config: IndexConfig, trainable: int | None = None) -> IndexSpec:
    """The index type from the vector count (the rule is documented on IndexConfig).

    `trainable` is how many vectors may be used for training (the held-out queries may not).
    """
    trainable = n if trainable is None else trainable
    if n < config.flat_below:
        return IndexSpec("Flat", 0)
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    while nlist > 1 and trainable < 39 * nlist:
        nlist //= 2
    if n < config.pq_from:
        return IndexSpec(f"IVF{nlist},Flat", nlist)
    m = config.pq_m or max(1, dim // 4)
    while dim % m:
        m -= 1
    # 8-bit codebooks need 256 centroids per sub-quantizer; small corpora get 4-bit ones
    bits = 8 if n >= 39 * 256 else 4
    return IndexSpec(f"IVF{nlist},PQ{m}x{bits}", nlist)


@dataclass
class IndexBuild:
    model: str
    version: str
    build_id: str
    path: str
    index_type: str
    vectors: int
    rejects: int
    dim: int
    nlist: int
    nprobe: int
    recall_at_k: float
    k: int
    target_recall: float
    passed: bool
    recall_by_nprobe: dict[str, float]
    index_bytes: int
    index_sha256: str
    build_s: float
    created: str
    shards: int
    model_created: str = ""
    # which shards the build covers: an incremental update (backfill/incremental.py) adds only the others
    shard_names: list[str] = field(default_factory=list)


def collect(layout: Layout, model: str, version: str, shards: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Vectors, ids and uris of every non-rejected image; raises IncompleteError unless
    every manifest id is covered exactly once by completed shards of this version."""
    problems: list[str] = []
    ids_by_shard: dict[str, np.ndarray] = {}
    vec_parts, id_parts, uris, rejects = [], [], [], 0
    for shard in shards:
        out = layout.embeddings(model, version, shard)
        if not layout.store.exists(f"{out}/{MARKER}"):
            problems.append(f"shard {shard} has no completion marker (its partition has not finished)")
            continue
        manifest = read_shard(layout, shard)
        ids, vectors, valid = load_embeddings(layout, model, version, shard)
        if len(ids) != len(manifest) or not np.array_equal(ids, manifest.image_ids):
            missing = np.setdiff1d(manifest.image_ids, ids)
            problems.append(
                f"shard {shard}: {len(ids)} committed rows for {len(manifest)} manifest ids "
                f"({len(missing)} missing, {len(ids) - len(np.unique(ids))} duplicated)"
            )
            continue
        ids_by_shard[shard] = ids
        vec_parts.append(vectors[valid])
        id_parts.append(ids[valid])
        uris.extend(u for u, ok in zip(manifest.uris, valid) if ok)
        rejects += int((~valid).sum())
    dup = find_cross_shard_duplicates(ids_by_shard)
    if dup:
        problems.append(dup)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise IncompleteError(f"embeddings of {model}/{version} are incomplete: {shown}")
    if not vec_parts or not sum(len(v) for v in vec_parts):
        raise IncompleteError(f"embeddings of {model}/{version} hold no vectors (shards: {len(shards)})")
    return np.concatenate(vec_parts), np.concatenate(id_parts), uris, rejects


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = sum(len(set(f[:k]) & set(t[:k]) - {-1}) for f, t in zip(found, truth))
    return hits / (len(truth) * k)


@dataclass
class TrainedIndex:
    index: faiss.Index
    spec: IndexSpec
    nprobe: int
    recall: float
    recall_by_nprobe: dict[str, float]
    k: int


def train_index(vectors: np.ndarray, config: IndexConfig) -> TrainedIndex:
    """Choose, train and fill an index, then tune nprobe to config.target_recall.

    Recall@k is measured against exact search on held-out queries: a deterministic
    sample of the vectors that the training sample never includes. Each query is also
    in the index, so its own position is dropped from both answers: recall counts only
    the other neighbours.
    """
    n, dim = vectors.shape
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n)
    n_queries = min(config.n_queries, max(1, n // 10))
    query_pos = order[:n_queries]
    spec = choose_index(n, dim, config, trainable=n - n_queries)
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.is_ivf:
        index.train(vectors[order[n_queries : n_queries + config.train_points_per_centroid * spec.nlist]])
    index.add(vectors)  # ids are positions; the ids file maps them back to image ids

    k = min(config.k, n - 1) if n > 1 else 1
    queries = vectors[query_pos]

    def answer(idx: faiss.Index) -> np.ndarray:
        _, found = idx.search(queries, k + 1)
        return np.array([[p for p in row if p != q][:k] for row, q in zip(found, query_pos)])

    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    truth = answer(exact)
    recall_by_nprobe: dict[str, float] = {}
    if not spec.is_ivf:
        return TrainedIndex(index, spec, 0, recall_at_k(answer(index), truth, k), recall_by_nprobe, k)
    ivf = faiss.extract_index_ivf(index)
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        recall_by_nprobe[str(nprobe)] = recall_at_k(answer(index), truth, k)
        if recall_by_nprobe[str(nprobe)] >= config.target_recall or nprobe >= spec.nlist:
            break
        nprobe = min(nprobe * 2, spec.nlist)
    return TrainedIndex(index, spec, nprobe, recall_by_nprobe[str(nprobe)], recall_by_nprobe, k)


def build_index(
    layout: Layout,
    model: str,
    version: str,
    shards: list[str],
    config: IndexConfig,
    *,
    model_created: str = "",
    log: Callable[[str], None] = lambda msg: None,
) -> IndexBuild:
    """Build an immutable, checked index for one model version; build.json is written last."""
    started = time.perf_counter()
    vectors, ids, uris, rejects = collect(layout, model, version, shards)
    n, dim = vectors.shape
    log(f"{n} vectors of dim {dim} from {len(shards)} shards ({rejects} rejects)")

    trained = train_index(vectors, config)
    index, spec, nprobe, recall = trained.index, trained.spec, trained.nprobe, trained.recall
    blob = faiss.serialize_index(index).tobytes()
    build_id = f"{version}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    path = layout.index_build(model, build_id)
    build = IndexBuild(
        model=model,
        version=version,
        build_id=build_id,
        path=path,
        index_type=spec.factory,
        vectors=n,
        rejects=rejects,
        dim=dim,
        nlist=spec.nlist,
        nprobe=nprobe,
        recall_at_k=round(recall, 4),
        k=trained.k,
        target_recall=config.target_recall,
        passed=recall >= config.target_recall,
        recall_by_nprobe=trained.recall_by_nprobe,
        index_bytes=len(blob),
        index_sha256=hashlib.sha256(blob).hexdigest(),
        build_s=0.0,
        created=datetime.now(timezone.utc).isoformat(),
        shards=len(shards),
        model_created=model_created,
        shard_names=sorted(shards),
    )
    layout.store.write_bytes(f"{path}/{INDEX_FILE}", blob)
    ids_table = pa.table({"image_id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string())})
    buf = io.BytesIO()
    pq.write_table(ids_table, buf)
    layout.store.write_bytes(f"{path}/{IDS_FILE}", buf.getvalue())
    build.build_s = round(time.perf_counter() - started, 3)
    layout.store.write_json(f"{path}/{BUILD_FILE}", asdict(build))  # last: the build exists once this does
    log(f"{spec.factory}: recall@{trained.k}={recall:.4f} at nprobe={nprobe} (target {config.target_recall}) in {build.build_s:.1f}s")
    return build


def read_build(layout: Layout, model: str, build_id: str) -> IndexBuild:
    path = f"{layout.index_build(model, build_id)}/{BUILD_FILE}"
    try:
        return IndexBuild(**layout.store.read_json(path))
    except FileNotFoundError:
        raise IncompleteError(f"index build {model}/{build_id} is not complete: no {BUILD_FILE} at {layout.store.display(path)}") from None


def latest_build(layout: Layout, model: str, version: str) -> IndexBuild | None:
    """The newest complete build of a model version (builds without build.json are ignored)."""
    builds = []
    for build_id in layout.store.ls(layout.index_builds(model)):
        if build_id.startswith(f"{version}-") and layout.store.exists(f"{layout.index_build(model, build_id)}/{BUILD_FILE}"):
            build = read_build(layout, model, build_id)
            if build.version == version:
                builds.append(build)
    return max(builds, key=lambda b: b.created) if builds else None
