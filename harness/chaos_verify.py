"""The chaos harness's checks from storage alone: what CURRENT names at every moment, an unpublished build's ids."""

from __future__ import annotations

import hashlib
import io
import threading

import numpy as np
import pyarrow.parquet as pq

from backfill.embed import read_chunks
from backfill.errors import IncompleteError
from backfill.index import IDS_FILE, INDEX_FILE, latest_build, read_build
from backfill.manifest import list_shards
from backfill.publish import read_pointer
from backfill.settings import DEFAULT_MODEL
from backfill.storage import Layout

MODEL = DEFAULT_MODEL


class PointerWatcher:
    """Reads CURRENT every 0.2 s during a round; each build it names must be complete, passed and intact.

    (The end-of-round verdict sees only the last pointer; this sees every swap.) A read that
    fails because the store is down (an S3 outage) is skipped, not counted as a problem.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.seen: set[str] = set()
        self.problems: list[str] = []

    def run(self, done: threading.Event) -> None:
        while not done.wait(0.2):
            try:
                self.check()
            except IncompleteError as e:
                if str(e) not in self.problems:
                    self.problems.append(f"CURRENT named an incomplete build: {e}")
            except Exception:  # noqa: BLE001 - the store is unreachable: nothing was read, so nothing to judge
                continue

    def check(self) -> None:
        pointer = read_pointer(self.layout, MODEL)
        if not pointer or pointer["build_id"] in self.seen:
            return
        build_id = pointer["build_id"]
        build = read_build(self.layout, MODEL, build_id)  # IncompleteError (a problem) if build.json is missing
        blob = self.layout.store.read_bytes(f"{self.layout.index_build(MODEL, build_id)}/{INDEX_FILE}")
        if not build.passed or hashlib.sha256(blob).hexdigest() != build.index_sha256:
            self.problems.append(f"CURRENT named {build_id}, which is not a passed, intact build")
        self.seen.add(build_id)


def build_mismatch(layout: Layout, version: str, problems: list[str]) -> int:
    """Ids in the version's newest build but not among its committed embeddings, or the reverse, or twice."""
    build = latest_build(layout, MODEL, version)
    if build is None:
        problems.append(f"{version}: no complete index build")
        return 0
    if not build.passed:
        problems.append(f"{version}: its build {build.build_id} did not pass its recall gate")
    folder = layout.index_build(MODEL, build.build_id)
    indexed = pq.read_table(io.BytesIO(layout.store.read_bytes(f"{folder}/{IDS_FILE}"))).column("image_id")
    indexed = indexed.to_numpy()
    embedded = []
    for shard in list_shards(layout):
        table = read_chunks(layout, layout.embeddings(MODEL, version, shard), columns=["image_id", "embedding"])
        if table is not None:
            valid = table.column("embedding").is_valid().to_numpy(zero_copy_only=False)
            embedded.append(table.column("image_id").to_numpy()[valid])
    expected = np.concatenate(embedded) if embedded else np.zeros(0, np.int64)
    return len(np.setxor1d(indexed, expected)) + (len(indexed) - len(np.unique(indexed)))
