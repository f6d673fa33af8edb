"""build_index: check completeness, plan, train on a sample, add per shard, merge, measure recall, write the build."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import faiss
from fsspec.implementations.local import LocalFileSystem

from backfill.config import IndexConfig
from backfill.errors import ConfigError, IncompleteError, RetryableError
from backfill.index_build import (
    BlockReader,
    BuildWork,
    add_part,
    load_queries,
    merge_parts,
    part_is_valid,
    part_truth,
    prepare,
    train,
    trained_index,
)
from backfill.index_quality import drop_self, merge_results, tune_nprobe
from backfill.storage import Layout, Store, file_sha256

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"  # row i: image_id and uri of the vector FAISS holds under id i (its position)
BUILD_FILE = "build.json"
LISTS_FILE = "lists.ivfdata"  # only for an index merged on disk: its inverted lists, memory-mapped


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
    # written since the budgeted build; builds from before read with these empty
    plan: str = ""  # why this index type
    memory_budget_mb: int = 0
    steps: dict[str, float] = field(default_factory=dict)  # seconds per step, parts built and reused
    lists_file: str = ""  # LISTS_FILE when the inverted lists live beside the index file


def new_build(version: str, model: str, layout: Layout, **fields) -> IndexBuild:
    """A build record with a fresh id and path; the writer fills in the index file's size and checksum."""
    build_id = f"{version}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    created = datetime.now(timezone.utc).isoformat()
    return IndexBuild(
        model=model,
        version=version,
        build_id=build_id,
        path=layout.index_build(model, build_id),
        index_bytes=0,
        index_sha256="",
        build_s=0.0,
        created=created,
        **fields,
    )


@contextlib.contextmanager
def timed(steps: dict[str, float], name: str) -> Iterator[None]:
    began = time.perf_counter()
    yield
    steps[f"{name}_s"] = round(time.perf_counter() - began, 3)


STEPS_FILE = "steps.json"  # in the work folder: what start_build measured, read by finish_build


def build_index(
    layout: Layout,
    model: str,
    version: str,
    shards: list[str],
    config: IndexConfig,
    *,
    model_created: str = "",
    log: Callable[[str], None] = lambda msg: None,
    ids_checked: bool = False,
) -> IndexBuild:
    """Build an immutable, checked index for one model version; build.json is written last.

    The three stages in one process: start_build (scan, plan, train), add_parts over every shard, and
    finish_build (merge, ground truth, tune, write). faiss_index runs them as separate steps, the adds in
    parallel groups (shard_groups). Parts committed by an interrupted attempt are reused.
    """
    work = start_build(layout, model, version, shards, config, log=log, ids_checked=ids_checked)
    added = add_parts(layout, work, [s.name for s in work.spans])
    return finish_build(layout, work, [added], model_created=model_created, log=log)


def start_build(
    layout: Layout,
    model: str,
    version: str,
    shards: list[str],
    config: IndexConfig,
    *,
    log: Callable[[str], None] = lambda msg: None,
    ids_checked: bool = False,
) -> BuildWork:
    """Scan (completeness, unique ids), plan and train; the work folder then holds everything the add and
    finish stages need (work.json, the ids file, the trained index, the queries, steps.json), so each can
    run in another process or pod. A retry finds the same folder and skips a committed training."""
    started, steps = time.time(), {}
    with tempfile.TemporaryDirectory(prefix="index-build-") as tmp:
        with timed(steps, "scan"):
            work = prepare(layout, model, version, sorted(shards), config, f"{tmp}/{IDS_FILE}", ids_checked=ids_checked)
            put_file(layout.store, f"{tmp}/{IDS_FILE}", f"{work.folder}/{IDS_FILE}")
    plan = work.plan
    log(
        f"{work.vectors} vectors of dim {work.dim} from {len(shards)} shards ({work.rejects} rejects): "
        f"{plan.factory}, {plan.reason}"
    )
    reader = BlockReader(layout, model, version, plan.block_rows)
    with timed(steps, "train"):
        train(layout, work, reader)
    steps["largest_block"] = reader.largest_block
    layout.store.write_json(f"{work.folder}/{STEPS_FILE}", {"started": started, "steps": steps})
    return work


def shard_groups(work: BuildWork, parallelism: int, min_vectors: int = 1) -> list[list[str]]:
    """The shards in at most `parallelism` contiguous groups of about equal vectors, one add step each
    (a bounded number of steps whatever the number of shards), and no more groups than hold `min_vectors`
    each (a small version is one add step: a step's start-up would cost more than its share of the add)."""
    total = max(1, work.vectors)
    n = max(1, min(parallelism, len(work.spans), total // max(1, min_vectors)))
    groups: list[list[str]] = [[] for _ in range(n)]
    for span in work.spans:
        # a shard goes to the group its middle vector falls in
        groups[min(len(groups) - 1, (2 * span.first + span.vectors) * len(groups) // (2 * total))].append(span.name)
    return [g for g in groups if g]


def add_parts(layout: Layout, work: BuildWork, shards: list[str]) -> dict[str, float]:
    """add_part for each shard (valid committed parts reused); returns what it did, for finish_build."""
    reader = BlockReader(layout, work.model, work.version, work.plan.block_rows)
    began = time.perf_counter()
    built = sum(add_part(layout, work, shard, reader) for shard in shards)
    return {
        "add_s": round(time.perf_counter() - began, 3),
        "parts_built": built,
        "parts_reused": len(shards) - built,
        "largest_block": reader.largest_block,
    }


def finish_build(
    layout: Layout,
    work: BuildWork,
    added: list[dict[str, float]],
    *,
    model_created: str = "",
    log: Callable[[str], None] = lambda msg: None,
) -> IndexBuild:
    """Merge the parts (every shard's must be committed), merge their ground truth, tune nprobe and write
    the build; then remove the work folder. `added`: what each add_parts call returned."""
    missing = [s.name for s in work.spans if not part_is_valid(layout, work, s.name)]
    if missing:
        raise IncompleteError(
            f"index build {work.folder}: no valid part for shards {missing[:5]} ({len(missing)}): run their add step"
        )
    record = layout.store.read_json(f"{work.folder}/{STEPS_FILE}")
    steps, plan, config, k = dict(record["steps"]), work.plan, work.config, work.k
    # parallel add steps: add_s is the longest one (the stage's wall time when they overlap)
    steps["add_s"] = max((a["add_s"] for a in added), default=0.0)
    for key in ("parts_built", "parts_reused"):
        steps[key] = int(sum(a[key] for a in added))
    steps["largest_block"] = max([steps.get("largest_block", 0), *(a["largest_block"] for a in added)])
    shards = [s.name for s in work.spans]
    build = new_build(
        work.version,
        work.model,
        layout,
        index_type=plan.factory,
        vectors=work.vectors,
        rejects=work.rejects,
        dim=work.dim,
        nlist=plan.nlist,
        nprobe=0,
        recall_at_k=0.0,
        k=k,
        target_recall=config.target_recall,
        passed=False,
        recall_by_nprobe={},
        shards=len(shards),
        model_created=model_created,
        shard_names=shards,
        plan=plan.reason,
        memory_budget_mb=config.memory_budget_mb,
        steps=steps,
    )
    with timed(steps, "merge"):
        lists = _lists_path(layout, build) if plan.ondisk else None
        index = merge_parts(trained_index(layout, work), [work.part(s) for s in shards], layout.store, lists)
    with timed(steps, "ground_truth"):
        own, queries = load_queries(layout, work)
        # each part holds its shard's exact top-(k+1): merged here, no second pass over the vectors
        found = merge_results((part_truth(layout, work, s) for s in shards), len(own), k + 1)
        truth = drop_self(found, own, k)
    with timed(steps, "tune"):
        tuning = tune_nprobe(index, queries, truth, config.target_recall, own)
    build.nprobe, build.recall_at_k, build.recall_by_nprobe = (
        tuning.nprobe,
        round(tuning.recall, 4),
        tuning.recall_by_nprobe,
    )
    build.passed = tuning.recall >= config.target_recall
    with tempfile.TemporaryDirectory(prefix="index-build-") as tmp:
        layout.store.get_file(f"{work.folder}/{IDS_FILE}", f"{tmp}/{IDS_FILE}")
        build.build_s = round(time.time() - record["started"], 3)
        write_build(layout, build, index, f"{tmp}/{IDS_FILE}")
    layout.store.rm(work.folder, recursive=True)  # the parts are in the build now; a retry before this reuses them
    log(
        f"{plan.factory}: recall@{k}={tuning.recall:.4f} at nprobe={tuning.nprobe} "
        f"(target {config.target_recall}) in {build.build_s:.1f}s"
    )
    return build


def _lists_path(layout: Layout, build: IndexBuild) -> str:
    # FAISS records the lists file's path inside the index: it must be written where it will be read
    if not isinstance(layout.store.fs, LocalFileSystem):
        raise ConfigError(
            f"index of {build.model}/{build.version} does not fit memory_budget_mb and would be merged on disk, "
            "which needs a local store: raise memory_budget_mb or build on a local volume"
        )
    os.makedirs(build.path, exist_ok=True)
    build.lists_file = LISTS_FILE
    return f"{build.path}/{LISTS_FILE}"


def write_build(layout: Layout, build: IndexBuild, index: faiss.Index, ids_file: str) -> IndexBuild:
    """The one build writer: the index file, the ids file, then build.json last (the build exists once it does).

    Files are staged locally and copied up whole (never a second in-memory copy of the index)."""
    with tempfile.TemporaryDirectory(prefix="index-write-") as tmp:
        local = os.path.join(tmp, INDEX_FILE)
        faiss.write_index(index, local)
        build.index_bytes, build.index_sha256 = os.path.getsize(local), file_sha256(local)
        if build.lists_file:
            build.index_bytes += os.path.getsize(f"{build.path}/{build.lists_file}")
        put_file(layout.store, local, f"{build.path}/{INDEX_FILE}")
    put_file(layout.store, ids_file, f"{build.path}/{IDS_FILE}")
    layout.store.write_json(f"{build.path}/{BUILD_FILE}", asdict(build))
    return build


def put_file(store: Store, local: str, path: str) -> None:
    """Commit a local file at path atomically: a temporary name then os.replace, or one PUT to an object store."""
    try:
        if not isinstance(store.fs, LocalFileSystem):
            store.fs.put_file(local, path)  # one (multipart) upload: the object appears whole or not at all
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            shutil.copyfile(local, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError as exc:
        raise RetryableError(f"could not write {store.display(path)}: {exc}") from exc


def read_build(layout: Layout, model: str, build_id: str) -> IndexBuild:
    path = f"{layout.index_build(model, build_id)}/{BUILD_FILE}"
    try:
        return IndexBuild(**layout.store.read_json(path))
    except FileNotFoundError:
        raise IncompleteError(
            f"index build {model}/{build_id} is not complete: no {BUILD_FILE} at {layout.store.display(path)}"
        ) from None


def latest_build(layout: Layout, model: str, version: str) -> IndexBuild | None:
    """The newest complete build of a model version (builds without build.json are ignored)."""
    builds = []
    for build_id in layout.store.ls(layout.index_builds(model)):
        if build_id.startswith(f"{version}-") and layout.store.exists(
            f"{layout.index_build(model, build_id)}/{BUILD_FILE}"
        ):
            build = read_build(layout, model, build_id)
            if build.version == version:
                builds.append(build)
    return max(builds, key=lambda b: b.created) if builds else None
