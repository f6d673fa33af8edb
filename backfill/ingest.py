"""`backfill ingest`: folders, s3:// prefixes, WebDataset tars, URI lists, img2dataset output -> manifest shards."""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import io
import json
import os
import re
import socket
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from backfill.errors import ManifestError, PermanentError
from backfill.manifest import list_shards, read_shard, write_shard
from backfill.storage import Layout, filesystem_options, protocol_of
from backfill.tar import SEP, Member, is_tar, list_members, member_uri, split_member_uri

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
LIST_SUFFIXES = {".txt": "text", ".lst": "text", ".list": "text", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_SHARD_SIZE = 100_000  # docs/performance.md: partitions long compared to their start-up
MAX_SHARD_SIZE = 10_000_000
# derived from the manifests (rebuilt from them when lost), kept out of corpus/ like manifest-index/
LEDGER = "ingest-ledger"
READ_WORKERS = 8  # ledger entries read at once
LOCK = "LOCK"  # ingest-ledger/LOCK: one ingest at a time per root (root_lock)

# skip reasons, counted in the summary
NOT_IMAGE = "not an image extension"
HIDDEN = "hidden file"
UNREADABLE = "unreadable"
EMPTY = "empty file"
ALREADY = "already ingested"
DUPLICATE = "duplicate in source"
NOT_DOWNLOADED = "img2dataset: not downloaded"
MISSING = "img2dataset: image file missing"
TAR_NOT_IMAGE = "tar member: not an image extension"  # a WebDataset sample's .json, .txt, .cls
TAR_HIDDEN = "tar member: hidden file"
TAR_EMPTY = "tar member: empty"
TAR_NOT_FILE = "tar member: not a regular file"  # folders, links
TAR_CUT = "tar member: cut off by the end of the tar"
TAR_UNREADABLE = "tar: not an uncompressed tar"
TAR_BAD_PATH = "tar: its own path contains '.tar#'"  # its members' URIs would name another tar
TARS_READ = "tars read"  # IngestResult.listing


class IngestError(PermanentError):
    """The source or an option is unusable; the message names the input and what is wrong."""


@dataclass(frozen=True)
class Candidate:
    """One listed file: a canonical URI (or why it is skipped), the user's image_id if the source has one."""

    uri: str
    skip: str | None = None
    image_id: int | None = None
    source_url: str | None = None  # img2dataset: the URL the image was downloaded from
    tar_offset: int | None = None  # a tar member: where its bytes are in the tar (manifest columns tar_*)
    tar_size: int | None = None


@dataclass
class IngestResult:
    source: str
    kind: str
    seen: int = 0
    new: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: list[tuple[str, int, int, int]] = field(default_factory=list)  # name, rows, first id, last id
    listing: Counter = field(default_factory=Counter)  # what the listing opened: TARS_READ

    @property
    def tars(self) -> int:
        return self.listing[TARS_READ]

    def _seen(self) -> str:
        if not self.tars:
            return f"{self.seen} files seen"
        return f"{self.seen} files and tar members seen ({self.tars} tars read)"

    def progress_line(self, elapsed_s: float) -> str:
        rate = self.seen / elapsed_s if elapsed_s > 0 else 0.0
        return (
            f"{self._seen()}, {self.new} new, {sum(self.skipped.values())} skipped, "
            f"{len(self.shards)} shards written ({rate:.0f} files/s)"
        )

    def describe(self) -> str:
        lines = [f"ingested {self.source} ({self.kind}): {self._seen()}, {self.new} new"]
        for reason, count in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  skipped {count:8d}  {reason}")
        if self.shards:
            lines.append(f"wrote {len(self.shards)} manifest shards:")
            shown = self.shards if len(self.shards) <= 12 else self.shards[:5] + [None] + self.shards[-5:]
            for shard in shown:
                if shard is None:
                    lines.append(f"  ... {len(self.shards) - 10} more ...")
                else:
                    name, rows, lo, hi = shard
                    lines.append(f"  {name}: {rows} images, image_id {lo}..{hi}")
        else:
            lines.append("wrote no manifest shard: nothing new")
        return "\n".join(lines)


# ---- sources ---------------------------------------------------------------------------------------------


def open_source(source: str, listing: Counter | None = None) -> tuple[str, Iterator[Candidate]]:
    """The kind of source and its candidates, in a deterministic order; IngestError if it is unusable.

    Problems that can be seen up front (missing path, unknown list format, missing column) are raised
    here, before anything is written. A `.tar` (alone, or in a folder or under a prefix) gives its members;
    `listing` counts the tars read.
    """
    listing = Counter() if listing is None else listing
    if protocol_of(source) != "file":
        if os.path.splitext(source)[1].lower() in LIST_SUFFIXES:
            raise IngestError(f"source {source!r}: URI lists are read from a local file; copy it here first")
        return "tar" if is_tar(source) else "prefix", _list_prefix(source, listing)
    path = os.path.abspath(source.removeprefix("file://"))
    if os.path.isdir(path):
        metadata = _img2dataset_metadata(path)
        if metadata:
            return "img2dataset", _list_img2dataset(path, metadata)
        return "folder", _list_folder(path, listing)
    if not os.path.exists(path):
        raise IngestError(
            f"source {source!r} does not exist (a folder, an s3:// prefix, a .tar or a .txt/.csv/.parquet list)"
        )
    if is_tar(path):
        return "tar", _local_tar(path, os.path.basename(path), listing)
    kind = LIST_SUFFIXES.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise IngestError(
            f"source {source!r} is a file but not a URI list or a tar: use .tar (WebDataset), .txt (one URI per "
            "line), .csv (a 'uri' column, optional 'image_id') or .parquet (the same columns)"
        )
    return kind, {"text": _list_text, "csv": _list_csv, "parquet": _list_parquet}[kind](path)


def _image_skip(name: str) -> str | None:
    if name.startswith("."):
        return HIDDEN  # also macOS '._x.jpg' resource forks, which carry an image extension
    if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
        return NOT_IMAGE
    return None


def _list_folder(root: str, listing: Counter) -> Iterator[Candidate]:
    """Every file below root, recursively, in sorted order (symlinked folders are not followed); a tar's members."""

    def fail(exc: OSError) -> None:
        raise IngestError(f"source folder {root!r}: cannot list {exc.filename}: {exc.strerror}")

    for folder, dirs, files in os.walk(root, onerror=fail):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if is_tar(name) and not name.startswith("."):
                yield from _local_tar(path, name, listing)
                continue
            skip = _image_skip(name)
            if skip is None:
                # cheap checks only: decoding is the embedding step's job, with a reject reason per image
                try:
                    if os.stat(path).st_size == 0:
                        skip = EMPTY
                    elif not os.access(path, os.R_OK):
                        skip = UNREADABLE
                except OSError:
                    skip = UNREADABLE  # a dangling symlink, or removed while listing
            yield Candidate(path, skip)


def _list_prefix(prefix: str, listing: Counter) -> Iterator[Candidate]:
    """Every object under an s3:// (or other fsspec) prefix, listed once, now, in key order; a tar's members."""
    protocol = protocol_of(prefix)
    try:
        fs = fsspec.filesystem(protocol, **filesystem_options(protocol))
    except (ValueError, ImportError) as exc:
        raise IngestError(f"source {prefix!r}: no filesystem for protocol {protocol!r} ({exc})") from None
    try:
        found = fs.find(prefix.rstrip("/"), detail=True)
    except FileNotFoundError:
        found = {}
    except PermissionError as exc:
        raise IngestError(f"source {prefix!r}: listing refused ({exc}); check the credentials") from None
    if not found:
        raise IngestError(f"source {prefix!r}: no objects under this prefix")

    def walk() -> Iterator[Candidate]:
        for key in sorted(found):
            info = found[key]
            if info.get("type") == "directory":
                continue
            name = key.rsplit("/", 1)[-1]
            if is_tar(name) and not name.startswith(".") and info.get("size"):
                # one sequential read of the tar's headers (fsspec's read-ahead: large ranged GETs)
                yield from _tar(fs.unstrip_protocol(key), lambda k=key: fs.open(k, "rb"), info["size"], listing)
                continue
            skip = _image_skip(name)
            if skip is None and not info.get("size"):
                skip = EMPTY
            yield Candidate(fs.unstrip_protocol(key), skip)

    return walk()


def _local_tar(path: str, name: str, listing: Counter) -> Iterator[Candidate]:
    try:
        size = os.stat(path).st_size
    except OSError:
        yield Candidate(path, UNREADABLE)
        return
    if size == 0:
        yield Candidate(path, EMPTY)
    elif not os.access(path, os.R_OK):
        yield Candidate(path, UNREADABLE)
    else:
        yield from _tar(path, lambda: open(path, "rb"), size, listing)


def _tar(uri: str, opener: Callable[[], IO[bytes]], size: int, listing: Counter) -> Iterator[Candidate]:
    """A WebDataset (any uncompressed) tar's image members, as `tar#member` URIs with their data's range."""
    if split_member_uri(uri + SEP) != (uri, ""):
        yield Candidate(uri, TAR_BAD_PATH)
        return
    with opener() as f:
        try:
            members = list_members(f)  # opened on the first next()
            first = next(members, None)
        except tarfile.ReadError:
            yield Candidate(uri, TAR_UNREADABLE)
            return
        listing[TARS_READ] += 1
        if first is not None:
            yield _member(uri, first, size)
        for m in members:
            yield _member(uri, m, size)


def _member(tar_uri: str, m: Member, tar_bytes: int) -> Candidate:
    uri = member_uri(tar_uri, m.name)
    skip = {NOT_IMAGE: TAR_NOT_IMAGE, HIDDEN: TAR_HIDDEN}.get(_image_skip(os.path.basename(m.name)) or "")
    if not m.regular:
        skip = TAR_NOT_FILE
    elif skip is None and m.size == 0:
        skip = TAR_EMPTY
    elif skip is None and m.offset + m.size > tar_bytes:
        skip = TAR_CUT
    return Candidate(uri, skip, tar_offset=m.offset, tar_size=m.size)


def _canonical(uri: str, base: str) -> str:
    """A URI as the manifest records it: local paths absolute (relative ones against the list's folder)."""
    if uri.startswith("file://"):  # the same file as its bare path, which a folder ingest records
        uri = uri[len("file://") :]
    elif "://" in uri:
        return uri
    return os.path.normpath(os.path.join(base, os.path.expanduser(uri)))


def _parse_id(raw: object, where: str) -> int | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise IngestError(f"{where}: image_id {raw!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise IngestError(f"{where}: image_id {value} is outside 0..2^63-1")
    return value


def _list_text(path: str) -> Iterator[Candidate]:
    base = os.path.dirname(path)
    with open(path, encoding="utf-8") as f:
        for line in f:
            uri = line.strip()
            if uri and not uri.startswith("#"):
                yield Candidate(_canonical(uri, base))


def _list_csv(path: str) -> Iterator[Candidate]:
    base = os.path.dirname(path)
    f = open(path, newline="", encoding="utf-8")  # noqa: SIM115 (closed by the generator)
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    if "uri" not in columns:
        f.close()
        raise IngestError(f"CSV {path!r} has no 'uri' column (its header: {columns}); add a header row with 'uri'")

    def rows() -> Iterator[Candidate]:
        with f:
            for line, row in enumerate(reader, start=2):
                uri = (row.get("uri") or "").strip()
                if not uri:
                    raise IngestError(f"CSV {path!r} line {line}: empty uri")
                yield Candidate(_canonical(uri, base), image_id=_parse_id(row.get("image_id"), f"{path} line {line}"))

    return rows()


def _list_parquet(path: str) -> Iterator[Candidate]:
    base = os.path.dirname(path)
    try:
        file = pq.ParquetFile(path)
    except pa.ArrowInvalid as exc:
        raise IngestError(f"Parquet list {path!r} is not readable: {exc}") from None
    names = file.schema_arrow.names
    if "uri" not in names:
        raise IngestError(f"Parquet list {path!r} has no 'uri' column (has {names})")
    columns = ["uri"] + (["image_id"] if "image_id" in names else [])

    def rows() -> Iterator[Candidate]:
        row = 0
        for batch in file.iter_batches(columns=columns, batch_size=65536):
            data = batch.to_pydict()
            for i, uri in enumerate(data["uri"]):
                row += 1
                if not uri:
                    raise IngestError(f"Parquet list {path!r} row {row}: empty uri")
                ids = data.get("image_id")
                yield Candidate(_canonical(uri, base), image_id=_parse_id(ids[i] if ids else None, f"{path} row {row}"))

    return rows()


def _img2dataset_metadata(folder: str) -> list[str]:
    """The img2dataset metadata files (NNNNN.parquet with 'key' and 'url' columns) directly in folder."""
    found = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".parquet") and not name.startswith("."):
            try:
                names = pq.read_schema(os.path.join(folder, name)).names
            except (pa.ArrowInvalid, OSError):
                continue
            if "key" in names and "url" in names:
                found.append(name)
    return found


def _list_img2dataset(folder: str, metadata: list[str]) -> Iterator[Candidate]:
    """img2dataset's `--output_format files`: NNNNN.parquet rows (key, url, status) + NNNNN/<key>.<ext>."""
    for name in metadata:
        stem = name[: -len(".parquet")]
        images = os.path.join(folder, stem)
        if not os.path.isdir(images):
            if os.path.exists(images + ".tar"):
                raise IngestError(
                    f"img2dataset output {folder!r}: {stem}.tar is webdataset output, which ingest reads as tars "
                    f"(without the source_url column): backfill ingest {os.path.join(folder, stem)}.tar, or re-run "
                    "img2dataset with --output_format files"
                )
            raise IngestError(f"img2dataset output {folder!r}: {name} has no image folder {stem}/ beside it")
        by_key = {}
        for file in os.listdir(images):
            key, ext = os.path.splitext(file)
            if ext.lower() in IMAGE_EXTENSIONS:
                by_key[key] = file
        table = pq.read_table(os.path.join(folder, name))
        cols = table.to_pydict()
        statuses = cols.get("status") or [None] * table.num_rows
        for key, url, status in zip(cols["key"], cols["url"], statuses):
            file = by_key.get(str(key))
            path = os.path.join(images, file or f"{key}.jpg")
            if status is not None and status != "success":
                yield Candidate(path, NOT_DOWNLOADED, source_url=url)
            elif file is None:
                yield Candidate(path, MISSING, source_url=url)
            else:
                yield Candidate(path, source_url=url)


# ---- the ledger: which canonical URIs are already in a manifest shard, and the next free id ----------------


def uri_hashes(uris: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """128 bits of BLAKE2b per canonical URI, as two uint64 arrays (64 bits alone would collide at 10^9)."""
    digest = b"".join(hashlib.blake2b(u.encode("utf-8", "surrogateescape"), digest_size=16).digest() for u in uris)
    pairs = np.frombuffer(digest, dtype="<u8").reshape(-1, 2) if uris else np.zeros((0, 2), np.uint64)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def ledger_path(layout: Layout, shard: str) -> str:
    return layout.store.url(LEDGER, f"{shard}.npz")


@dataclass
class Ledger:
    """The URI hashes of every manifest shard, sorted, and the first id after every shard's ids."""

    high: np.ndarray
    low: np.ndarray
    next_id: int

    def contains(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        if not len(self.high):
            return np.zeros(len(high), bool)
        pos = np.searchsorted(self.high, high)
        at = np.minimum(pos, len(self.high) - 1)
        same_high = (pos < len(self.high)) & (self.high[at] == high)
        found = same_high & (self.low[at] == low)
        for i in np.flatnonzero(same_high & ~found):  # equal high halves, other low half first: walk the run
            j = pos[i] + 1
            while j < len(self.high) and self.high[j] == high[i] and not found[i]:
                found[i] = self.low[j] == low[i]
                j += 1
        return found


def _write_ledger_entry(layout: Layout, shard: str, uris: list[str], ids: np.ndarray) -> tuple[np.ndarray, ...]:
    high, low = uri_hashes(uris)
    order = np.lexsort((low, high))
    span = np.array([int(ids.min()), int(ids.max()), len(ids)] if len(ids) else [-1, -1, 0], np.int64)
    buf = io.BytesIO()
    np.savez(buf, high=high[order], low=low[order], span=span)
    layout.store.write_bytes(ledger_path(layout, shard), buf.getvalue())
    return high[order], low[order], span


def load_ledger(layout: Layout) -> Ledger:
    """One small file per shard (16 bytes per image), READ_WORKERS at a time (a store's latency, not CPU,
    bounds it); manifests are never re-read, except one that has no entry yet (see _ledger_entry)."""
    highs, lows, next_id = [], [], 0
    with ThreadPoolExecutor(READ_WORKERS) as pool:
        for entry in pool.map(lambda shard: _ledger_entry(layout, shard), list_shards(layout)):
            if entry is None:
                continue
            high, low, span = entry
            highs.append(high)
            lows.append(low)
            next_id = max(next_id, int(span[1]) + 1)
    high = np.concatenate(highs) if highs else np.zeros(0, np.uint64)
    low = np.concatenate(lows) if lows else np.zeros(0, np.uint64)
    order = np.lexsort((low, high))
    return Ledger(high[order], low[order], next_id)


def _ledger_entry(layout: Layout, shard: str) -> tuple[np.ndarray, ...] | None:
    """A shard's entry; built from its manifest (and written) when it has none: a shard not written by
    ingest, a crash between a manifest and its entry, or an entry that does not load."""
    try:
        with np.load(io.BytesIO(layout.store.read_bytes(ledger_path(layout, shard))), allow_pickle=False) as z:
            return z["high"], z["low"], z["span"]
    except (FileNotFoundError, ValueError, KeyError, zipfile.BadZipFile):
        pass
    try:
        manifest = read_shard(layout, shard)
    except ManifestError:
        return None  # discovery refuses it too; its URIs are not ingested
    return _write_ledger_entry(layout, shard, [u for u in manifest.uris if u], manifest.image_ids)


# ---- ingest ------------------------------------------------------------------------------------------------


def _check_options(shard_size: int, prefix: str) -> None:
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise IngestError(f"shard size must be in 1..{MAX_SHARD_SIZE}, got {shard_size}")
    if not prefix or prefix[0] == "." or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in prefix):
        raise IngestError(f"shard prefix {prefix!r} may only use letters, digits, '-', '_' and '.'")


def _next_shard_number(layout: Layout, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"-(\d+)")
    numbers = [int(m.group(1)) for n in list_shards(layout) if (m := pattern.fullmatch(n))]
    return max(numbers, default=-1) + 1


def ingest(
    layout: Layout,
    source: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    prefix: str = "ingest",
    progress: Callable[[IngestResult, float], None] | None = None,
    progress_every: int = 10_000,
    progress_every_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> IngestResult:
    """Write the source's new images as new manifest shards of shard_size rows, ids after every existing id.

    Idempotent: a canonical URI already in any manifest shard is skipped, so a re-run writes nothing and a
    later run writes only the new files, as new shards (an existing shard is never rewritten or appended to).
    One ingest at a time per root (root_lock): a second one would pick the same ids.
    """
    _check_options(shard_size, prefix)
    with root_lock(layout):
        return _ingest(layout, source, shard_size, prefix, progress, progress_every, progress_every_s, clock)


def _ingest(
    layout: Layout,
    source: str,
    shard_size: int,
    prefix: str,
    progress: Callable[[IngestResult, float], None] | None,
    progress_every: int,
    progress_every_s: float,
    clock: Callable[[], float],
) -> IngestResult:
    listing: Counter = Counter()
    kind, candidates = open_source(source, listing)
    result = IngestResult(source=source, kind=kind, listing=listing)
    ledger = load_ledger(layout)
    number = _next_shard_number(layout, prefix)
    start = last_report = clock()
    reported = (-1, -1)
    # lists may repeat a URI (folders and prefixes cannot): the URIs of this run's shards, as a few sorted
    # segments (16 bytes per image, not a Python set), plus a set of the pending shard's only
    written = _Segments()
    pending_keys: set[tuple[int, int]] = set()
    user_ids: set[int] = set()  # ids a CSV/Parquet list gives, checked unique within the source
    with_ids: bool | None = None
    pending: list[Candidate] = []
    next_id = ledger.next_id

    def flush() -> None:
        nonlocal number, next_id
        if not pending:
            return
        name = f"{prefix}-{number:06d}"
        if layout.store.exists(layout.manifest(name)):
            raise IngestError(f"manifest shard {name!r} appeared while ingesting: is another ingest running here?")
        given = [c.image_id for c in pending]
        if any(i is None for i in given):
            ids = np.arange(next_id, next_id + len(pending), dtype=np.int64)
        else:
            ids = np.array(given, np.int64)
        columns = {"image_id": pa.array(ids, pa.int64()), "uri": _uri_array([c.uri for c in pending])}
        if any(c.source_url for c in pending):
            columns["source_url"] = pa.array([c.source_url for c in pending], pa.string())
        members = any(c.tar_offset is not None for c in pending)
        if members:  # manifest.TAR_COLUMNS: null on plain-file rows
            columns["tar_offset"] = pa.array([c.tar_offset for c in pending], pa.int64())
            columns["tar_size"] = pa.array([c.tar_size for c in pending], pa.int64())
        write_shard(layout, name, pa.table(columns))  # the manifest first: it is the truth
        high, low, _ = _write_ledger_entry(layout, name, [c.uri for c in pending], ids)  # rebuilt if lost
        if kind not in ("folder", "prefix") or members:
            written.push(Ledger(high, low, 0))
        result.shards.append((name, len(ids), int(ids.min()), int(ids.max())))
        next_id = max(next_id, int(ids.max()) + 1)
        number += 1
        pending.clear()
        pending_keys.clear()

    for batch in _batches(candidates, 4096):
        high, low = uri_hashes([c.uri for c in batch])
        known = ledger.contains(high, low)
        repeated = written.contains(high, low)  # shards flushed before this batch
        batch_keys: set[tuple[int, int]] = set()  # and the ones flushed during it
        for c, h, lo, is_known, is_repeated in zip(batch, high.tolist(), low.tolist(), known, repeated):
            result.seen += 1
            skip = c.skip or (ALREADY if is_known else None)
            # a tar may hold a name twice (an appended member): the first one is ingested
            if skip is None and (kind not in ("folder", "prefix") or c.tar_offset is not None):
                if is_repeated or (h, lo) in pending_keys or (h, lo) in batch_keys:
                    skip = DUPLICATE
                pending_keys.add((h, lo))
                batch_keys.add((h, lo))
            if skip:
                result.skipped[skip] += 1
                continue
            if with_ids is None:
                with_ids = c.image_id is not None
            elif with_ids != (c.image_id is not None):
                has = "has" if c.image_id is not None else "has no"
                raise IngestError(
                    f"{source}: image_id is given for some rows and not others ({c.uri} {has} image_id, "
                    "unlike the rows before it); give it for all rows or for none"
                )
            if c.image_id is not None:
                if c.image_id in user_ids:
                    raise IngestError(f"{source}: image_id {c.image_id} is given twice (second time for {c.uri})")
                user_ids.add(c.image_id)
            pending.append(c)
            result.new += 1
            if len(pending) >= shard_size:
                # `repeated` was looked up before this batch: the pending URIs of earlier batches that this
                # flush moves into `written` must still count as seen for the rest of the batch
                batch_keys |= pending_keys
                flush()
        now = clock()
        if progress and (result.seen % progress_every < len(batch) or now - last_report >= progress_every_s):
            progress(result, now - start)
            last_report, reported = now, (result.seen, len(result.shards))
    flush()
    if result.seen == 0:
        raise IngestError(f"source {source!r} is empty: no files listed")
    if progress and reported != (result.seen, len(result.shards)):
        progress(result, clock() - start)
    return result


@contextlib.contextmanager
def root_lock(layout: Layout) -> Iterator[None]:
    """Hold ingest-ledger/LOCK (who holds it: host, pid, start time) for the body; IngestError naming the
    holder if another ingest holds it. A lock left by a crashed ingest on this host (its pid is gone) is
    taken over; one from another host must be deleted by hand (the error says which file).

    On a local root the lock is an exclusive create (O_EXCL); an object store has no such create through
    fsspec, so there it is a check then a PUT, which two ingests starting in the same second can both pass.
    """
    path = layout.store.url(LEDGER, LOCK)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": datetime.datetime.now(datetime.UTC).isoformat()}
    data = json.dumps(me).encode()
    local = isinstance(layout.store.fs, LocalFileSystem)
    for _ in range(2):
        try:
            if local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "xb") as f:
                    f.write(data)
            elif layout.store.exists(path):
                raise FileExistsError(path)
            else:
                layout.store.write_bytes(path, data)
            break
        except FileExistsError:
            holder = _lock_holder(layout, path)
            if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                with contextlib.suppress(FileNotFoundError):
                    layout.store.rm(path)  # its ingest is gone: every shard it wrote is whole
                continue
            raise IngestError(
                f"another ingest is running on this root: {layout.store.display(path)} is held by "
                f"{holder or 'an unreadable lock'}; wait for it, or delete that file if it is not running"
            ) from None
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            layout.store.rm(path)


def _lock_holder(layout: Layout, path: str) -> dict:
    try:
        holder = layout.store.read_json(path)
        return holder if isinstance(holder, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


class _Segments:
    """Sorted hash segments of this run's shards, merged like a binary counter: O(log shards) lookups each."""

    def __init__(self) -> None:
        self.parts: list[Ledger] = []

    def push(self, part: Ledger) -> None:
        self.parts.append(part)
        while len(self.parts) > 1 and len(self.parts[-1].high) >= len(self.parts[-2].high):
            b, a = self.parts.pop(), self.parts.pop()
            high, low = np.concatenate([a.high, b.high]), np.concatenate([a.low, b.low])
            order = np.lexsort((low, high))
            self.parts.append(Ledger(high[order], low[order], 0))

    def contains(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        found = np.zeros(len(high), bool)
        for part in self.parts:
            found |= part.contains(high, low)
        return found


def _uri_array(uris: list[str]) -> pa.Array:
    try:
        return pa.array(uris, pa.string())
    except (UnicodeEncodeError, pa.ArrowInvalid):
        # local paths that are not valid UTF-8: raw bytes, which read_shard decodes the way the OS does
        return pa.array([os.fsencode(u) for u in uris], pa.binary())


def _batches(items: Iterator[Candidate], size: int) -> Iterator[list[Candidate]]:
    batch: list[Candidate] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
