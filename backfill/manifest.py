"""Manifest shards: the corpus listing, one immutable Parquet file per shard."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from backfill.errors import ManifestError
from backfill.storage import Layout

SUFFIX = ".parquet"


@dataclass(frozen=True)
class Shard:
    name: str
    image_ids: np.ndarray  # int64, unique within the shard
    uris: list[str | None]

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
    return Shard(name=name, image_ids=ids.astype(np.int64), uris=uris)


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
