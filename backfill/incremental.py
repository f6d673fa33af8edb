"""Near-line index updates: add new shards to a version's latest checked build instead of rebuilding it."""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backfill.config import IndexConfig
from backfill.errors import IncompleteError
from backfill.index import BUILD_FILE, IDS_FILE, INDEX_FILE, IndexBuild, build_index, choose_index, collect, latest_build, recall_at_k
from backfill.storage import Layout


class BaseBuildDamaged(IncompleteError):
    """The build an update would extend is damaged or gone; build_or_update falls back to a full build."""


@dataclass(frozen=True)
class IndexOutcome:
    build: IndexBuild
    mode: str  # "incremental" or "full"
    reason: str  # why this mode
    base_build_id: str = ""  # the build an incremental update started from
    added_shards: tuple[str, ...] = ()


def build_or_update(
    layout: Layout,
    model: str,
    version: str,
    shards: list[str],
    config: IndexConfig,
    *,
    model_created: str = "",
    log: Callable[[str], None] = lambda msg: None,
) -> IndexOutcome:
    """An index build of `version` that covers exactly `shards`.

    When the version's latest build passed its gate and covers a subset of `shards`, only the new
    shards are embedded into a copy of it (the IVF quantizer is already trained: `add` is enough);
    otherwise, or when the grown index would call for another index type (for IVF, another nlist:
    about every doubling of N), the whole index is rebuilt. Either way the result is a new
    immutable build with its own recall check, published by the same pointer swap.
    """
    base = latest_build(layout, model, version)
    new = sorted(set(shards) - set(base.shard_names)) if base else []
    reason = _why_full(base, shards, new)
    if reason is None:
        vectors, ids, uris, rejects = collect(layout, model, version, new)  # the new shards must be complete
        total = base.vectors + len(vectors)
        wanted = choose_index(total, base.dim, config, trainable=total - min(config.n_queries, max(1, total // 10))).factory
        if wanted != base.index_type:
            reason = f"{total} vectors call for {wanted}, the latest build is {base.index_type}"
        else:
            log(f"incremental: adding {len(new)} shards ({len(vectors)} vectors) to {base.build_id}")
            try:
                build = update_index(layout, base, vectors, ids, uris, rejects, new, config)
            except BaseBuildDamaged as exc:
                # the base is unusable, the embeddings are not: a full build from them still works
                reason = f"the latest build {base.build_id} cannot be extended: {exc}"
            else:
                return IndexOutcome(build, "incremental", f"added {len(new)} new shards to {base.build_id}", base.build_id, tuple(new))
    log(f"full build: {reason}")
    build = build_index(layout, model, version, shards, config, model_created=model_created, log=log)
    return IndexOutcome(build, "full", reason)


def _why_full(base: IndexBuild | None, shards: list[str], new: list[str]) -> str | None:
    if base is None:
        return "no earlier build of this version"
    if not base.passed:
        return f"the latest build {base.build_id} failed its recall gate"
    if not base.shard_names:
        return f"the latest build {base.build_id} does not record which shards it covers"
    gone = sorted(set(base.shard_names) - set(shards))
    if gone:
        return f"shards {gone[:5]} of {base.build_id} are no longer registered"
    if not new:
        return f"no new shards since {base.build_id}: a rebuild of the same shards (re-embedded or refreshed)"
    return None


def update_index(
    layout: Layout,
    base: IndexBuild,
    vectors: np.ndarray,
    ids: np.ndarray,
    uris: list[str],
    rejects: int,
    new_shards: list[str],
    config: IndexConfig,
) -> IndexBuild:
    """Add vectors to a copy of `base` and write the result as a new build (build.json last).

    The gate: recall@k of a seeded sample of the new vectors as queries, against exhaustive search
    over the same index (every inverted list probed: exact for Flat and IVF-Flat; for IVF-PQ it
    measures the probing loss only). nprobe starts at the base's and doubles until the target holds.
    """
    started = time.perf_counter()
    folder = layout.index_build(base.model, base.build_id)
    try:
        blob = layout.store.read_bytes(f"{folder}/{INDEX_FILE}")
        ids_blob = layout.store.read_bytes(f"{folder}/{IDS_FILE}")
    except FileNotFoundError as exc:
        raise BaseBuildDamaged(f"index build {base.model}/{base.build_id} lost a file ({exc})") from None
    if hashlib.sha256(blob).hexdigest() != base.index_sha256:
        raise BaseBuildDamaged(f"index build {base.model}/{base.build_id}: {INDEX_FILE} does not match its sha256")
    index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    try:
        table = pq.read_table(io.BytesIO(ids_blob))
    except pa.ArrowException as exc:
        raise BaseBuildDamaged(f"index build {base.model}/{base.build_id}: {IDS_FILE} is unreadable ({exc})") from None
    base_ids = table.column("image_id").to_numpy()
    if len(base_ids) != index.ntotal or index.ntotal != base.vectors:
        raise BaseBuildDamaged(f"index build {base.model}/{base.build_id}: {len(base_ids)} ids, {index.ntotal} vectors, build.json says {base.vectors}")
    if vectors.shape[1] != index.d:
        raise IncompleteError(f"shards {new_shards} of {base.model}/{base.version} have dim {vectors.shape[1]}, the index has {index.d}")
    repeated = np.intersect1d(base_ids, ids)
    if len(repeated):
        raise IncompleteError(f"{len(repeated)} image ids of shards {new_shards} are already in {base.build_id} (e.g. {int(repeated[0])})")
    # positions are the index's ids (as in build_index): appended vectors continue after the base's
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    nprobe, recall, by_nprobe, k = _check(index, base, vectors, config)

    blob = faiss.serialize_index(index).tobytes()
    build_id = f"{base.version}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    path = layout.index_build(base.model, build_id)
    shard_names = sorted(set(base.shard_names) | set(new_shards))
    build = IndexBuild(
        **{
            **asdict(base),
            "build_id": build_id,
            "path": path,
            "vectors": int(index.ntotal),
            "rejects": base.rejects + rejects,
            "nprobe": nprobe,
            "recall_at_k": round(recall, 4),
            "k": k,
            "target_recall": config.target_recall,
            "passed": recall >= config.target_recall,
            "recall_by_nprobe": by_nprobe,
            "index_bytes": len(blob),
            "index_sha256": hashlib.sha256(blob).hexdigest(),
            "created": datetime.now(timezone.utc).isoformat(),
            "shards": len(shard_names),
            "shard_names": shard_names,
        }
    )
    layout.store.write_bytes(f"{path}/{INDEX_FILE}", blob)
    added = pa.table({"image_id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string())})
    buf = io.BytesIO()
    pq.write_table(pa.concat_tables([table.select(["image_id", "uri"]), added]), buf)
    layout.store.write_bytes(f"{path}/{IDS_FILE}", buf.getvalue())
    build.build_s = round(time.perf_counter() - started, 3)
    layout.store.write_json(f"{path}/{BUILD_FILE}", asdict(build))  # last: the build exists once this does
    return build


def _check(index: faiss.Index, base: IndexBuild, added: np.ndarray, config: IndexConfig) -> tuple[int, float, dict[str, float], int]:
    n = index.ntotal
    k = min(config.k, n - 1) if n > 1 else 1
    if base.nlist == 0:
        return 0, 1.0, {}, k  # Flat is exhaustive: its answers are the exact ones by construction
    rng = np.random.default_rng(config.seed)
    picked = np.sort(rng.permutation(len(added))[: min(config.n_queries, len(added))])
    positions = base.vectors + picked  # where those vectors now sit in the index
    queries = np.ascontiguousarray(added[picked], dtype=np.float32)

    def answer() -> np.ndarray:
        _, found = index.search(queries, k + 1)
        return np.array([[p for p in row if p != q][:k] for row, q in zip(found, positions)])

    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = ivf.nlist
    truth = answer()
    by_nprobe: dict[str, float] = {}
    nprobe = max(1, base.nprobe)
    while True:
        ivf.nprobe = nprobe
        by_nprobe[str(nprobe)] = recall_at_k(answer(), truth, k)
        if by_nprobe[str(nprobe)] >= config.target_recall or nprobe >= ivf.nlist:
            break
        nprobe = min(nprobe * 2, ivf.nlist)
    return nprobe, by_nprobe[str(nprobe)], by_nprobe, k
