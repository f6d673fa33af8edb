"""The index build's steps: scan shards for completeness, stream blocks, train on a sample, add per shard, merge."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from backfill.config import IndexConfig
from backfill.errors import ConfigError, IncompleteError
from backfill.finalise import MARKER
from backfill.id_check import check_unique
from backfill.index_plan import IndexPlan, plan_index
from backfill.index_quality import blas_distances, exact_search
from backfill.manifest import read_shard
from backfill.storage import Layout, Store
from backfill.writer import is_chunk, read_chunks

TRAINED, QUERIES, WORK = "trained.faiss", "queries.npy", "work.json"


@dataclass(frozen=True)
class ShardSpan:
    name: str
    first: int  # position of the shard's first vector in the build (positions are the index's ids)
    vectors: int  # embedded rows; rejects are not indexed


@dataclass(frozen=True)
class BuildWork:
    """A build in progress: what was scanned and planned, and the folder its resumable outputs live in."""

    model: str
    version: str
    folder: str
    spans: tuple[ShardSpan, ...]
    dim: int
    rejects: int
    plan: IndexPlan
    config: IndexConfig

    @property
    def vectors(self) -> int:
        return sum(s.vectors for s in self.spans)

    @property
    def k(self) -> int:
        """The k of recall@k: config.k, or fewer when the version holds fewer other vectors."""
        return min(self.config.k, self.vectors - 1) if self.vectors > 1 else 1

    def part(self, shard: str) -> str:
        return f"{self.folder}/parts/{shard}.faiss"

    @classmethod
    def load(cls, layout: Layout, folder: str) -> BuildWork:
        record = layout.store.read_json(f"{folder}/{WORK}")
        spans = tuple(ShardSpan(**s) for s in record["spans"])
        plan, config = IndexPlan(**record["plan"]), IndexConfig(**record["config"])
        return cls(record["model"], record["version"], folder, spans, record["dim"], record["rejects"], plan, config)


class BlockReader:
    """A version's embeddings, shard by shard, in blocks of at most `rows` vectors (rejects skipped).

    `largest_block` records the most vectors handed out at once: what a step's memory is sized by.
    """

    def __init__(self, layout: Layout, model: str, version: str, rows: int) -> None:
        self.layout, self.model, self.version, self.rows = layout, model, version, max(1, rows)
        self.largest_block = 0

    def blocks(self, spans: tuple[ShardSpan, ...]) -> Iterator[tuple[int, np.ndarray]]:
        for span in spans:
            yield from self.shard_blocks(span)

    def shard_blocks(self, span: ShardSpan) -> Iterator[tuple[int, np.ndarray]]:
        """(first position, float32 vectors) blocks of one shard, in row order."""
        pending: list[np.ndarray] = []
        held, at = 0, span.first
        for vectors in self._batches(span.name):
            pending.append(vectors)
            held += len(vectors)
            while held >= self.rows:
                joined = np.concatenate(pending)
                yield self._hand_out(at, joined[: self.rows])
                at, held = at + self.rows, held - self.rows
                pending = [joined[self.rows :]]
        if held:
            yield self._hand_out(at, np.concatenate(pending))
            at += held
        if at - span.first != span.vectors:
            raise IncompleteError(
                f"shard {span.name} of {self.model}/{self.version}: {at - span.first} embedded vectors for "
                f"{span.vectors} rows without an error: re-embed the shard"
            )

    def _hand_out(self, first: int, block: np.ndarray) -> tuple[int, np.ndarray]:
        self.largest_block = max(self.largest_block, len(block))
        return first, block

    def _batches(self, shard: str) -> Iterator[np.ndarray]:
        out = self.layout.embeddings(self.model, self.version, shard)
        for name in sorted(n for n in self.layout.store.ls(out) if is_chunk(n)):
            chunk = pq.ParquetFile(io.BytesIO(self.layout.store.read_bytes(f"{out}/{name}")))
            for batch in chunk.iter_batches(batch_size=self.rows, columns=["embedding"]):
                emb = batch.column(0)
                dim = emb.type.list_size
                values = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim)[emb.offset : emb.offset + len(emb)]
                yield values[emb.is_valid().to_numpy(zero_copy_only=False)].astype(np.float32)


def scan_shards(
    layout: Layout, model: str, version: str, shards: list[str], ids_path: str
) -> tuple[list[ShardSpan], int, int]:
    """Check that every manifest id is covered exactly once by completed shards, and write the ids file
    (image_id, uri of each indexed vector, in position order) to ids_path; returns (spans, dim, rejects).

    Reads each shard's manifest and the id and error columns of its chunks, one shard at a time."""
    problems: list[str] = []
    spans: list[ShardSpan] = []
    dims: set[int] = set()
    rejects = position = 0
    schema = pa.schema([("image_id", pa.int64()), ("uri", pa.string())])
    with pq.ParquetWriter(ids_path, schema) as writer:
        for shard in shards:
            out = layout.embeddings(model, version, shard)
            if not layout.store.exists(f"{out}/{MARKER}"):
                problems.append(f"shard {shard} has no completion marker (its partition has not finished)")
                continue
            manifest = read_shard(layout, shard)
            table = read_chunks(layout, out, columns=["image_id", "error"])
            ids = table.column("image_id").to_numpy() if table is not None else np.zeros(0, np.int64)
            if len(ids) != len(manifest) or not np.array_equal(ids, manifest.image_ids):
                missing = np.setdiff1d(manifest.image_ids, ids)
                problems.append(
                    f"shard {shard}: {len(ids)} committed rows for {len(manifest)} manifest ids "
                    f"({len(missing)} missing, {len(ids) - len(np.unique(ids))} duplicated)"
                )
                continue
            valid = table.column("error").is_null().to_numpy(zero_copy_only=False)
            dims.add(_dim(layout, out))
            uris = [u for u, ok in zip(manifest.uris, valid) if ok]
            writer.write_table(
                pa.table({"image_id": pa.array(ids[valid], pa.int64()), "uri": pa.array(uris, pa.string())})
            )
            spans.append(ShardSpan(shard, position, int(valid.sum())))
            position += int(valid.sum())
            rejects += int((~valid).sum())
    if len(dims) > 1:
        problems.append(f"shards hold embeddings of dimensions {sorted(dims)}: re-embed the odd ones")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise IncompleteError(f"embeddings of {model}/{version} are incomplete: {shown}")
    if not position:
        raise IncompleteError(f"embeddings of {model}/{version} hold no vectors (shards: {len(shards)})")
    return spans, dims.pop(), rejects


def _dim(layout: Layout, out: str) -> int:
    first = next(n for n in layout.store.ls(out) if is_chunk(n))
    schema = pq.ParquetFile(io.BytesIO(layout.store.read_bytes(f"{out}/{first}"))).schema_arrow
    return schema.field("embedding").type.list_size


def prepare(
    layout: Layout,
    model: str,
    version: str,
    shards: list[str],
    config: IndexConfig,
    ids_path: str,
    *,
    ids_checked: bool = False,
) -> BuildWork:
    """Scan and plan; the work folder is named by what was scanned and the config, so a retry of the same
    build finds the outputs an earlier attempt committed (a re-embedded shard gets a new folder).

    `ids_checked`: the caller has just run check_unique over exactly these shards (an incremental update
    that fell back to a full build); it reads every shard's ids, so it is not run twice."""
    if not ids_checked:
        check_unique(layout, shards)  # no image_id in two shards, in bounded memory, before anything is built
    spans, dim, rejects = scan_shards(layout, model, version, shards, ids_path)
    plan = plan_index(sum(s.vectors for s in spans), dim, config)
    markers = [layout.store.read_bytes(f"{layout.embeddings(model, version, s.name)}/{MARKER}") for s in spans]
    # how many add steps run does not change a part: a retry with another add_parallelism reuses them
    settings = {k: v for k, v in asdict(config).items() if k != "add_parallelism"}
    key = hashlib.sha256(json.dumps([version, [asdict(s) for s in spans], settings]).encode())
    for marker in markers:
        key.update(marker)
    folder = layout.store.url("indexes", model, "work", f"{version}-{key.hexdigest()[:16]}")
    work = BuildWork(model, version, folder, tuple(spans), dim, rejects, plan, config)
    record = {**asdict(work), "spans": [asdict(s) for s in spans], "plan": asdict(plan), "config": asdict(config)}
    layout.store.write_json(f"{folder}/{WORK}", record)
    return work


def sample_positions(n: int, plan: IndexPlan, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(query positions, training positions): deterministic, disjoint, sorted; queries are never trained on."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(n, plan.n_queries + plan.train_size, replace=False)
    return np.sort(picked[: plan.n_queries]), np.sort(picked[plan.n_queries :])


def gather(blocks: Iterator[tuple[int, np.ndarray]], positions: np.ndarray, dim: int) -> np.ndarray:
    """The vectors at sorted positions, picked from the blocks as they stream by."""
    out = np.empty((len(positions), dim), dtype=np.float32)
    for first, block in blocks:
        lo, hi = np.searchsorted(positions, [first, first + len(block)])
        out[lo:hi] = block[positions[lo:hi] - first]
    return out


def train(layout: Layout, work: BuildWork, reader: BlockReader) -> None:
    """Train the planned index on its sample and commit it empty, with the held-out queries (skipped when done)."""
    store = layout.store
    if store.exists(f"{work.folder}/{TRAINED}") and store.exists(f"{work.folder}/{QUERIES}"):
        return
    queries_at, train_at = sample_positions(work.vectors, work.plan, work.config.seed)
    picked = np.concatenate([queries_at, train_at])
    order = np.argsort(picked)
    vectors = np.empty((len(picked), work.dim), dtype=np.float32)
    vectors[order] = gather(reader.blocks(work.spans), picked[order], work.dim)
    index = faiss.index_factory(work.dim, work.plan.factory, faiss.METRIC_INNER_PRODUCT)
    if work.plan.is_ivf:
        faiss.extract_index_ivf(index).cp.niter = work.config.train_iterations
        index.train(vectors[len(queries_at) :])
    buf = io.BytesIO()
    np.savez(buf, positions=queries_at, vectors=vectors[: len(queries_at)])
    store.write_bytes(f"{work.folder}/{QUERIES}", buf.getvalue())
    store.write_bytes(f"{work.folder}/{TRAINED}", _blob(index))  # last: the step is done once this exists


def load_queries(layout: Layout, work: BuildWork) -> tuple[np.ndarray, np.ndarray]:
    """(positions, vectors) of the held-out queries chosen by train."""
    saved = np.load(io.BytesIO(layout.store.read_bytes(f"{work.folder}/{QUERIES}")))
    return saved["positions"], saved["vectors"]


def trained_index(layout: Layout, work: BuildWork) -> faiss.Index:
    try:
        return _index(layout.store.read_bytes(f"{work.folder}/{TRAINED}"))
    except FileNotFoundError:
        raise IncompleteError(f"index build {work.folder}: no trained index; run the train step first") from None


def add_part(layout: Layout, work: BuildWork, shard: str, reader: BlockReader) -> bool:
    """One shard's vectors added to a copy of the trained index, committed as its part file, with the shard's
    exact top-(k+1) for the held-out queries (the ground truth is merged from these: no pass of its own);
    returns False without work when a valid part is already there (a retried build resumes). Independent
    of the other parts: each may run as its own step."""
    if part_is_valid(layout, work, shard):
        return False
    span = next(s for s in work.spans if s.name == shard)
    index = trained_index(layout, work)
    _, queries = load_queries(layout, work)

    def added(blocks: Iterator[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
        for first, block in blocks:
            if work.plan.is_ivf:
                index.add_with_ids(block, np.arange(first, first + len(block), dtype=np.int64))
            else:
                index.add(block)  # Flat parts are concatenated in shard order: positions by construction
            yield first, block

    with blas_distances():  # the IVF add assigns each block to its lists: a distance computation
        scores, found = exact_search(added(reader.shard_blocks(span)), queries, work.k + 1)
    buf = io.BytesIO()
    np.savez(buf, scores=scores, positions=found)
    layout.store.write_bytes(work.part(shard) + ".truth.npz", buf.getvalue())
    blob = _blob(index)
    layout.store.write_bytes(work.part(shard), blob)
    marker = {"vectors": span.vectors, "sha256": hashlib.sha256(blob).hexdigest()}
    marker["truth_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    layout.store.write_json(work.part(shard) + ".json", marker)  # last: the part counts once this exists
    return True


def part_is_valid(layout: Layout, work: BuildWork, shard: str) -> bool:
    """A part counts when its marker is there and its files match it (a torn or stale file does not)."""
    span = next(s for s in work.spans if s.name == shard)
    try:
        marker = layout.store.read_json(work.part(shard) + ".json")
        blob = layout.store.read_bytes(work.part(shard))
        truth = layout.store.read_bytes(work.part(shard) + ".truth.npz")
    except FileNotFoundError:
        return False
    return (
        marker.get("vectors") == span.vectors
        and marker.get("sha256") == hashlib.sha256(blob).hexdigest()
        and marker.get("truth_sha256") == hashlib.sha256(truth).hexdigest()
    )


def part_truth(layout: Layout, work: BuildWork, shard: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions): the exact top-(k+1) of the held-out queries within one shard, from add_part."""
    saved = np.load(io.BytesIO(layout.store.read_bytes(work.part(shard) + ".truth.npz")))
    return saved["scores"], saved["positions"]


def merge_parts(trained: faiss.Index, parts: list[str], store: Store, ondisk: str | None = None) -> faiss.Index:
    """The parts (Store paths, in shard order) merged into the trained empty index, which is returned filled.

    In memory: every IVF list allocated once at its final size, then filled part by part (one part held
    at a time besides the result; ids kept as given: positions); Flat parts appended (Flat is for small N).
    With `ondisk` (a local file path for the inverted lists): faiss.contrib.ondisk.merge_ondisk, the parts
    memory-mapped, for an index larger than the budget."""
    if ondisk is None and not faiss.try_extract_index_ivf(trained):
        for path in parts:
            trained.merge_from(_open_part(path, store), 0)
        return trained
    if ondisk is None:
        return _merge_exact_size(trained, parts, store)
    if not faiss.try_extract_index_ivf(trained):
        raise ConfigError("an on-disk merge needs an IVF index; raise memory_budget_mb for a Flat index this large")
    from faiss.contrib.ondisk import merge_ondisk

    with tempfile.TemporaryDirectory(prefix="index-parts-") as tmp:
        local = []
        for i, path in enumerate(parts):
            if isinstance(store.fs, LocalFileSystem):
                local.append(path)
            else:
                local.append(os.path.join(tmp, f"part-{i:06d}.faiss"))
                store.get_file(path, local[-1])
        merge_ondisk(trained, local, ondisk)
    return trained


def _merge_exact_size(trained: faiss.Index, parts: list[str], store: Store) -> faiss.Index:
    # IVF merge_from grows each list's vector by doubling: up to 2x the index in memory. Sizes first.
    ivf = faiss.extract_index_ivf(trained)
    sizes = np.zeros(ivf.nlist, dtype=np.int64)
    for path in parts:
        index = _open_part(path, store)  # held: its lists die with it
        part = faiss.extract_index_ivf(index).invlists
        sizes += np.array([part.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for i in np.flatnonzero(sizes):
        lists.resize(int(i), int(sizes[i]))
    filled = np.zeros(ivf.nlist, dtype=np.int64)
    for path in parts:
        index = _open_part(path, store)
        part = faiss.extract_index_ivf(index).invlists
        for i in range(ivf.nlist):
            n = part.list_size(i)
            if n:
                ids, codes = part.get_ids(i), part.get_codes(i)
                lists.update_entries(i, int(filled[i]), n, ids, codes)
                part.release_ids(i, ids)
                part.release_codes(i, codes)
                filled[i] += n
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    ivf.ntotal = trained.ntotal = int(sizes.sum())
    return trained


def _open_part(path: str, store: Store) -> faiss.Index:
    """A part file as an index; on a local store memory-mapped (read-only), so only what is copied is paged in."""
    if isinstance(store.fs, LocalFileSystem):
        return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    return _index(store.read_bytes(path))


def _blob(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def _index(blob: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
