"""WebDataset `.tar` shards: member URIs, listing members at ingest, and reading many members in one request."""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from backfill.images import BadImage

SEP = "#"  # a member's URI is the tar's URI, '#', the member's name: s3://b/x.tar#000123.jpg
SUFFIX = ".tar"
HEADER = tarfile.BLOCKSIZE  # the member's own 512-byte header sits right before its data
# One ranged read covers at most this many bytes: the fetch stage keeps at most READS_IN_FLIGHT + 2 reads
# waiting, so a partition holds at most ~(16 + 2) x 8 MiB = 144 MiB of tar bytes, about what 64 plain
# fetches of 16 rows of 150 KB hold. A span of members longer than this is split into several reads.
READ_BYTES = 8 << 20
READS_IN_FLIGHT = 16  # ranged reads at once (each carries many members: a plain fetch's 64 are not needed)
MAX_GAP = 1 << 20  # a gap (members the manifest does not list) larger than this starts a new read


def member_uri(tar_uri: str, name: str) -> str:
    return f"{tar_uri}{SEP}{name}"


def split_member_uri(uri: str) -> tuple[str, str] | None:
    """(tar URI, member name) of a member URI, split at the first '.tar#' (case-insensitive); else None."""
    at = uri.lower().find(SUFFIX + SEP)
    if at < 0:
        return None
    cut = at + len(SUFFIX)
    return uri[:cut], uri[cut + 1 :]


def is_tar(name: str) -> bool:
    return name.lower().endswith(SUFFIX)


@dataclass(frozen=True)
class MemberRanges:
    """Where each manifest row's bytes are inside its tar: data offset and size, -1 for a plain-file row."""

    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64

    def has(self, row: int) -> bool:
        return bool(self.offsets[row] >= 0)


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of its data, from the tar's first byte
    size: int
    regular: bool  # a regular file (not a folder, link or device)


def list_members(fileobj: IO[bytes]) -> Iterator[Member]:
    """The members of an uncompressed tar, reading headers in order (seeking past data where it can).

    tarfile.ReadError if the first header is not a tar header; a bad header later ends the listing
    (tarfile's own rule, kept for the headers it raises on), so a tar cut short lists the members before the cut.
    """
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError:
                return
            if info is None:
                return
            tar.members.clear()  # tarfile keeps every TarInfo it read; a tar of 10^5 members needs none of them
            yield Member(info.name, info.offset_data, info.size, info.isreg())


@dataclass
class TarRead:
    """One ranged read of a tar, [start, end), covering the members of `rows` (consecutive manifest rows)."""

    tar: str
    start: int
    end: int
    rows: list[int]


def plan(
    rows: list[int], uris, ranges: MemberRanges, group: int, cap: int | None = None, max_gap: int = MAX_GAP
) -> Iterator[list[int] | TarRead]:
    """Cut consecutive rows into fetch tasks, in order: runs of one tar's members in increasing offset
    become TarReads (split when a read would pass `cap` bytes, READ_BYTES by default, or skip more than
    `max_gap`), other rows lists of at most `group` rows fetched one request each."""
    cap = READ_BYTES if cap is None else cap
    plain: list[int] = []
    read: TarRead | None = None  # the read being extended (its rows list grows in place)
    for row in rows:
        parts = split_member_uri(uris[row]) if ranges.has(row) and isinstance(uris[row], str) else None
        if parts is None:
            if read:
                yield read
                read = None
            plain.append(row)
            if len(plain) == group:
                yield plain
                plain = []
            continue
        if plain:
            yield plain
            plain = []
        start = int(ranges.offsets[row]) - HEADER
        end = int(ranges.offsets[row]) + int(ranges.sizes[row])
        if read and read.tar == parts[0] and read.end <= start <= read.end + max_gap and end - read.start <= cap:
            read.rows.append(row)
            read.end = end
        else:
            if read:
                yield read
            read = TarRead(parts[0], start, end, [row])
    if read:
        yield read
    if plain:
        yield plain


def read_members(
    fetch: Callable[..., bytes], read: TarRead, uris, ranges: MemberRanges
) -> list[tuple[int, bytes | str]]:
    """(row, bytes) per member of one ranged read; a member the tar does not hold gives (row, reason).

    A missing tar is every member's reject; a tar cut short rejects the members past its end; a member
    whose header is not where the manifest says (the tar was rewritten since ingest) is rejected too.
    Outages raise RetryableError from fetch, as for a plain fetch.
    """
    try:
        buf = fetch(read.tar, start=read.start, end=read.end)
    except BadImage as exc:
        return [(row, f"{exc} (tar of member {uris[row]})") for row in read.rows]
    out: list[tuple[int, bytes | str]] = []
    for row in read.rows:
        offset, size = int(ranges.offsets[row]), int(ranges.sizes[row])
        at = offset - read.start
        if at + size > len(buf):
            out.append((row, f"missing tar member: {uris[row]} (the tar ends at byte {read.start + len(buf)})"))
        elif not _header_matches(buf, at - HEADER, size):
            out.append(
                (
                    row,
                    f"tar member moved: {uris[row]}: no header of a {size}-byte member before byte {offset}; "
                    "the tar changed since ingest (ingest it again)",
                )
            )
        else:
            out.append((row, bytes(buf[at : at + size])))
    return out


def _header_matches(buf: bytes, at: int, size: int) -> bool:
    """The 512 bytes at `at` are a valid tar header (its checksum) of a member of `size` bytes."""
    try:
        info = tarfile.TarInfo.frombuf(buf[at : at + HEADER], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return info.size == size
