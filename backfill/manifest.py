"""Manifest shards: the corpus listing, one immutable Parquet file per shard."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from backfill import tar
from backfill.errors import ManifestError
from backfill.storage import Layout
from backfill.tar import MemberRanges

SUFFIX = ".parquet"
TAR_COLUMNS = ("tar_offset", "tar_size")  # optional: where a row's bytes are inside its tar (backfill/tar.py)


@dataclass(frozen=True)
class Shard:
    name: str
    image_ids: np.ndarray  # int64, unique within the shard
    uris: list[str | None]
    members: MemberRanges | None = None  # a manifest with tar_offset/tar_size: rows that are tar members

    def __len__(self) -> int:
        return len(self.image_ids)


def list_shards(layout: Layout) -> list[str]:
    """Shard names, sorted; the manifest folder is the listing (no object listing of images)."""
    return [
        n[: -len(SUFFIX)] for n in layout.store.ls(layout.manifests) if n.endswith(SUFFIX) and not n.startswith(".")
    ]


def write_shard(layout: Layout, name: str, table: pa.Table) -> None:
    """Write a manifest shard atomically (shards are immutable once written)."""
    _validate_columns(name, table)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    layout.store.write_bytes(layout.manifest(name), buf.getvalue())


def read_shard(layout: Layout, name: str) -> Shard:
    path = layout.manifest(name)
    try:
        table = pq.read_table(io.BytesIO(layout.store.read_bytes(path)))
    except FileNotFoundError:
        raise ManifestError(f"manifest shard {name!r} not found at {layout.store.display(path)}") from None
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"manifest shard {name!r} is not a readable Parquet file: {exc}") from None
    _validate_columns(name, table)
    ids = table.column("image_id").to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1][:5].tolist()
        raise ManifestError(f"manifest shard {name!r} repeats image_id {dup}: every image_id must appear once")
    uris = table.column("uri").to_pylist()
    if pa.types.is_binary(table.schema.field("uri").type) or pa.types.is_large_binary(table.schema.field("uri").type):
        # raw bytes: local paths that are not valid UTF-8 (Parquet strings must be); decoded
        # the way the OS does, so open() gets the very same bytes back
        uris = [None if u is None else os.fsdecode(u) for u in uris]
    return Shard(name=name, image_ids=ids.astype(np.int64), uris=uris, members=_member_ranges(table))


def _member_ranges(table: pa.Table) -> MemberRanges | None:
    """tar_offset/tar_size as int64 arrays (-1 on plain-file rows); None for a manifest without them."""
    if TAR_COLUMNS[0] not in table.column_names:
        return None
    offsets, sizes = (table.column(c).fill_null(-1).to_numpy().astype(np.int64) for c in TAR_COLUMNS)
    return MemberRanges(offsets, sizes)


def _validate_columns(name: str, table: pa.Table) -> None:
    for column in ("image_id", "uri"):
        if column not in table.column_names:
            raise ManifestError(
                f"manifest shard {name!r} has no {column!r} column (has {table.column_names}); "
                "a manifest needs image_id (int64) and uri (string)"
            )
    if not pa.types.is_integer(table.schema.field("image_id").type):
        raise ManifestError(
            f"manifest shard {name!r}: image_id must be an integer column, got {table.schema.field('image_id').type}"
        )
    if table.column("image_id").null_count:
        raise ManifestError(f"manifest shard {name!r}: image_id has {table.column('image_id').null_count} null values")
    uri_type = table.schema.field("uri").type
    if not any(
        check(uri_type)
        for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    ):
        raise ManifestError(
            f"manifest shard {name!r}: uri must be a string (or binary, for non-UTF-8 paths) column, got {uri_type}"
        )
    if table.num_rows and pc.min(table.column("image_id")).as_py() < 0:
        raise ManifestError(f"manifest shard {name!r}: image_id must be non-negative")
    _validate_tar_columns(name, table)


def _validate_tar_columns(name: str, table: pa.Table) -> None:
    """Both tar columns or neither; integers; set on the same rows; offsets past a header, sizes >= 0."""
    present = [c for c in TAR_COLUMNS if c in table.column_names]
    if not present:
        return
    if len(present) == 1:
        missing = next(c for c in TAR_COLUMNS if c not in present)
        raise ManifestError(
            f"manifest shard {name!r} has {present[0]!r} but no {missing!r}: tar members need both columns"
        )
    for column in TAR_COLUMNS:
        kind = table.schema.field(column).type
        if not pa.types.is_integer(kind):
            raise ManifestError(f"manifest shard {name!r}: {column} must be an integer column, got {kind}")
    offset, size = (table.column(c) for c in TAR_COLUMNS)
    if not pc.all(pc.equal(pc.is_null(offset), pc.is_null(size))).as_py() and table.num_rows:
        raise ManifestError(
            f"manifest shard {name!r}: tar_offset and tar_size must be null on the same rows (plain files) "
            "and set on the same rows (tar members)"
        )
    if offset.null_count < table.num_rows:
        if pc.min(offset).as_py() < 512:
            raise ManifestError(
                f"manifest shard {name!r}: tar_offset must be a member's data offset (>= 512, after its header)"
            )
        if pc.min(size).as_py() < 0:
            raise ManifestError(f"manifest shard {name!r}: tar_size must be non-negative")
        uri = table.column("uri")
        if pa.types.is_string(uri.type) or pa.types.is_large_string(uri.type):  # raw-byte paths: not checked
            names = pc.match_substring(uri.filter(pc.is_valid(offset)), tar.SUFFIX + tar.SEP, ignore_case=True)
            if not pc.all(names).as_py():
                raise ManifestError(
                    f"manifest shard {name!r}: a row has tar_offset but its uri names no tar member; a member's uri "
                    "is the tar's, '#' and the member's name (s3://b/x.tar#000123.jpg)"
                )
