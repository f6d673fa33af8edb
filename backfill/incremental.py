"""Near-line index updates: add new shards to a version's latest checked build instead of rebuilding it."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backfill.config import IndexConfig
from backfill.errors import IncompleteError
from backfill.id_check import check_unique
from backfill.index import IDS_FILE, INDEX_FILE, IndexBuild, build_index, latest_build, new_build, write_build
from backfill.index_build import BlockReader, ShardSpan, scan_shards
from backfill.index_plan import block_rows, plan_index
from backfill.index_quality import drop_self, tune_nprobe
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


@dataclass(frozen=True)
class UpdateAttempt:
    """What try_update did: an incremental outcome, or why a full build is needed instead."""

    outcome: IndexOutcome | None
    reason: str  # why a full build (empty when outcome is set)
    ids_checked: bool  # check_unique already ran over exactly these shards: a full build need not repeat it


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
    """An index build of `version` that covers exactly `shards`: try_update, else a full build_index.

    Either way the result is a new immutable build with its own recall check, published by the same
    pointer swap. faiss_index runs the same rule with the full build's stages as separate steps.
    """
    attempt = try_update(layout, model, version, shards, config, log=log)
    if attempt.outcome is not None:
        return attempt.outcome
    log(f"full build: {attempt.reason}")
    build = build_index(
        layout, model, version, shards, config, model_created=model_created, log=log, ids_checked=attempt.ids_checked
    )
    return IndexOutcome(build, "full", attempt.reason)


def try_update(
    layout: Layout,
    model: str,
    version: str,
    shards: list[str],
    config: IndexConfig,
    *,
    log: Callable[[str], None] = lambda msg: None,
) -> UpdateAttempt:
    """The near-line path: when the version's latest build passed its gate and covers a subset of `shards`,
    only the new shards are embedded into a copy of it (the IVF quantizer is already trained: `add` is
    enough). Otherwise, or when the grown index would call for another index type (plan_index: for IVF,
    another nlist, about every doubling of N), or the base is damaged, it returns why a full build is needed.
    """
    base = latest_build(layout, model, version)
    new = sorted(set(shards) - set(base.shard_names)) if base else []
    reason = _why_full(base, shards, new)
    if reason is not None:
        return UpdateAttempt(None, reason, False)
    with tempfile.TemporaryDirectory(prefix="index-update-") as tmp:
        # no id of a new shard may be in any other shard, old or new (the registry sensor's tick check
        # can be skipped for non-range ids: this one cannot)
        check_unique(layout, shards)
        # the new shards must be complete; their positions continue after the base's
        spans, _, rejects = scan_shards(layout, model, version, new, f"{tmp}/{IDS_FILE}")
        spans = [replace(s, first=s.first + base.vectors) for s in spans]
        total = base.vectors + sum(s.vectors for s in spans)
        wanted = plan_index(total, base.dim, config).factory
        if wanted != base.index_type:
            return UpdateAttempt(
                None, f"{total} vectors call for {wanted}, the latest build is {base.index_type}", True
            )
        log(f"incremental: adding {len(new)} shards ({total - base.vectors} vectors) to {base.build_id}")
        try:
            build = update_index(layout, base, spans, f"{tmp}/{IDS_FILE}", rejects, config)
        except BaseBuildDamaged as exc:
            # the base is unusable, the embeddings are not: a full build from them still works
            return UpdateAttempt(None, f"the latest build {base.build_id} cannot be extended: {exc}", True)
    why = f"added {len(new)} new shards to {base.build_id}"
    return UpdateAttempt(IndexOutcome(build, "incremental", why, base.build_id, tuple(new)), "", True)


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


def _load_base(layout: Layout, base: IndexBuild) -> tuple[faiss.Index, pa.Table]:
    folder = layout.index_build(base.model, base.build_id)
    name = f"index build {base.model}/{base.build_id}"
    try:
        blob = layout.store.read_bytes(f"{folder}/{INDEX_FILE}")
        ids_blob = layout.store.read_bytes(f"{folder}/{IDS_FILE}")
    except FileNotFoundError as exc:
        raise BaseBuildDamaged(f"{name} lost a file ({exc})") from None
    if hashlib.sha256(blob).hexdigest() != base.index_sha256:
        raise BaseBuildDamaged(f"{name}: {INDEX_FILE} does not match its sha256")
    if base.lists_file:
        raise BaseBuildDamaged(f"{name} keeps its lists on disk ({base.lists_file}): it is rebuilt, not copied")
    index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    try:
        table = pq.read_table(io.BytesIO(ids_blob)).select(["image_id", "uri"])
    except (pa.ArrowException, KeyError) as exc:
        raise BaseBuildDamaged(f"{name}: {IDS_FILE} is unreadable ({exc})") from None
    if table.num_rows != index.ntotal or index.ntotal != base.vectors:
        raise BaseBuildDamaged(f"{name}: {table.num_rows} ids, {index.ntotal} vectors, build.json says {base.vectors}")
    return index, table


def update_index(
    layout: Layout, base: IndexBuild, spans: list[ShardSpan], ids_file: str, rejects: int, config: IndexConfig
) -> IndexBuild:
    """Add the shards' vectors (spans positioned after the base's) to a copy of `base`; write a new build.

    The gate: recall@k of a seeded sample of the new vectors as queries, against exhaustive search
    over the same index (every inverted list probed: exact for Flat and IVF-Flat; for IVF-PQ it
    measures the probing loss only). nprobe starts at the base's and doubles until the target holds.
    """
    started = time.perf_counter()
    index, table = _load_base(layout, base)
    added = pq.read_table(ids_file)
    repeated = np.intersect1d(table.column("image_id").to_numpy(), added.column("image_id").to_numpy())
    new_shards = [s.name for s in spans]
    if len(repeated):
        raise IncompleteError(
            f"{len(repeated)} image ids of shards {new_shards} are already in {base.build_id} (e.g. {int(repeated[0])})"
        )
    rng = np.random.default_rng(config.seed)
    n_new = sum(s.vectors for s in spans)
    own = base.vectors + np.sort(rng.permutation(n_new)[: min(config.n_queries, n_new)])
    queries = np.empty((len(own), index.d), dtype=np.float32)
    reader = BlockReader(layout, base.model, base.version, block_rows(index.d, config.memory_budget_mb * 2**20))
    for first, block in reader.blocks(tuple(spans)):
        if block.shape[1] != index.d:
            raise IncompleteError(
                f"shards {new_shards} of {base.model}/{base.version} have dim {block.shape[1]}, the index has {index.d}"
            )
        if faiss.try_extract_index_ivf(index):
            index.add_with_ids(block, np.arange(first, first + len(block), dtype=np.int64))
        else:
            index.add(block)  # Flat: appended, so at its position
        lo, hi = np.searchsorted(own, [first, first + len(block)])
        queries[lo:hi] = block[own[lo:hi] - first]
    nprobe, recall, by_nprobe, k = _check(index, base, queries, own, config)
    shard_names = sorted(set(base.shard_names) | set(new_shards))
    fields = {
        key: value
        for key, value in asdict(base).items()
        if key not in ("model", "version", "build_id", "path", "index_bytes", "index_sha256", "build_s", "created")
    }
    fields.update(
        vectors=int(index.ntotal),
        rejects=base.rejects + rejects,
        nprobe=nprobe,
        recall_at_k=round(recall, 4),
        k=k,
        target_recall=config.target_recall,
        passed=recall >= config.target_recall,
        recall_by_nprobe=by_nprobe,
        shards=len(shard_names),
        shard_names=shard_names,
        steps={"largest_block": reader.largest_block},
    )
    build = new_build(base.version, base.model, layout, **fields)
    with tempfile.TemporaryDirectory(prefix="index-update-") as tmp:
        ids = os.path.join(tmp, IDS_FILE)
        pq.write_table(pa.concat_tables([table, added.select(["image_id", "uri"]).cast(table.schema)]), ids)
        build.build_s = round(time.perf_counter() - started, 3)
        return write_build(layout, build, index, ids)


def _check(
    index: faiss.Index, base: IndexBuild, queries: np.ndarray, own: np.ndarray, config: IndexConfig
) -> tuple[int, float, dict[str, float], int]:
    n = index.ntotal
    k = min(config.k, n - 1) if n > 1 else 1
    if base.nlist == 0:
        return 0, 1.0, {}, k  # Flat is exhaustive: its answers are the exact ones by construction
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = ivf.nlist
    truth = drop_self(index.search(queries, k + 1)[1], own, k)
    tuning = tune_nprobe(index, queries, truth, config.target_recall, own, start=base.nprobe)
    return tuning.nprobe, tuning.recall, tuning.recall_by_nprobe, k
